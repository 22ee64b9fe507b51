//! faultfs mounted for real: what programs do through the kernel (write,
//! `fsync`, `fdatasync`, directory `fsync`, rename, unlink) reaches the model,
//! and after a power loss programs read what the model kept, not what the
//! kernel's caches remember.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A fresh mount point, removed (after the unmount) when dropped.
struct MountPoint(PathBuf);

impl MountPoint {
    fn new(tag: &str) -> MountPoint {
        let path = std::env::temp_dir().join(format!("faultfs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        MountPoint(path)
    }
}

impl Drop for MountPoint {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

fn sync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}

#[test]
fn only_what_was_synced_survives_power_loss() {
    let mountpoint = MountPoint::new("kernel");
    let Some(fs) = faultfs::mount_for_test(&mountpoint.0) else {
        return;
    };
    let root = fs.path().to_owned();
    let data = root.join("data");
    fs::create_dir(&data).unwrap();
    sync_dir(&root);

    // A synced file in a synced directory; then an unsynced append.
    let log = data.join("log");
    let mut file = File::create(&log).unwrap();
    file.write_all(&[1; 100_000]).unwrap();
    file.sync_all().unwrap();
    sync_dir(&data);
    file.write_all(b"tail not synced").unwrap();
    // fdatasync counts too: a second file synced that way, its name synced.
    let other = data.join("other");
    let mut second = File::create(&other).unwrap();
    second.write_all(b"datasync").unwrap();
    second.sync_data().unwrap();
    sync_dir(&data);
    // A file synced but its directory not: it must vanish.
    let orphan_dir = data.join("blobs");
    fs::create_dir(&orphan_dir).unwrap();
    sync_dir(&data);
    let blob = orphan_dir.join("17");
    let mut blob_file = File::create(&blob).unwrap();
    blob_file.write_all(b"blob").unwrap();
    blob_file.sync_all().unwrap();
    // A rename whose directory is not synced: undone.
    fs::rename(&other, data.join("renamed")).unwrap();
    // Unsynced overwrite in place, through a handle still open at the loss.
    file.seek(SeekFrom::Start(0)).unwrap();
    file.write_all(&[9; 10]).unwrap();
    assert!(!fs.is_clean());
    let stats = fs.stats();
    assert_eq!((stats.file_syncs, stats.dir_syncs), (3, 4), "{stats:?}");

    let loss = fs.power_loss();
    assert_eq!(loss.dropped_entries, ["/data/blobs/17", "/data/renamed"]);
    assert_eq!(loss.restored_entries, ["/data/other"]);
    assert_eq!(
        loss.reverted_files,
        [("/data/log".to_string(), 100_015, 100_000)]
    );
    // Reads go to the model: neither the page cache nor the open handle
    // shows the dropped bytes.
    assert_eq!(read(&log), vec![1; 100_000]);
    let mut via_old_handle = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut via_old_handle).ok();
    assert!(via_old_handle.is_empty() || via_old_handle == vec![1; 100_000]);
    assert_eq!(read(&other), b"datasync");
    assert!(!data.join("renamed").exists());
    assert!(!blob.exists());
    assert_eq!(fs::metadata(&log).unwrap().len(), 100_000);
    let mut names: Vec<_> = fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["blobs", "log", "other"]);
    drop((file, second, blob_file));

    // Truncation and unlink, synced, stick; sync_all after set_len keeps the size.
    let f = OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(10).unwrap();
    f.sync_all().unwrap();
    fs::remove_file(&other).unwrap();
    sync_dir(&data);
    assert!(fs.is_clean());
    assert_eq!(fs.power_loss(), faultfs::Loss::default());
    assert_eq!(read(&log), vec![1; 10]);
    assert!(!other.exists());
    drop(f);
    fs.unmount().unwrap();
}

#[test]
fn a_sync_hook_sees_the_path_and_can_fail_the_sync() {
    let mountpoint = MountPoint::new("hook");
    let Some(fs) = faultfs::mount_for_test(&mountpoint.0) else {
        return;
    };
    let root = fs.path().to_owned();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    fs.before_sync(Some(Box::new(move |path: &str| {
        record.lock().unwrap().push(path.to_string());
        path == "/b"
    })));
    let mut a = File::create(root.join("a")).unwrap();
    a.write_all(b"a").unwrap();
    a.sync_all().unwrap();
    let mut b = File::create(root.join("b")).unwrap();
    b.write_all(b"b").unwrap();
    let error = b.sync_all().unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO));
    sync_dir(&root);
    assert_eq!(*seen.lock().unwrap(), ["/a", "/b", "/"]);
    fs.before_sync(None);
    // a's sync was made, b's was not: keep the directory, drop b's byte.
    fs.power_loss();
    assert_eq!(read(&root.join("a")), b"a");
    assert_eq!(read(&root.join("b")), b"");
    drop((a, b));
    fs.unmount().unwrap();
}
