//! The disk model behind faultfs, without any FUSE or I/O: a tree of files
//! and directories that keeps, next to what programs see, what a power loss
//! would leave.
//!
//! A real disk has a volatile cache: written data and directory changes reach
//! stable storage only when the program asks for it (`fsync`, `fdatasync`).
//! The model is the strictest reading of that contract, and deterministic:
//!
//! - a file's durable content (bytes and size) is its content as of its last
//!   `fsync`/`fdatasync`; a file never synced is durably empty;
//! - a directory's durable entries (names and the inodes they point to) are
//!   its entries as of its last `fsync` of the directory itself; syncing a
//!   file does not make its name durable, so a file created and synced in a
//!   directory never synced disappears;
//! - a power loss drops everything else: every directory reverts to its
//!   durable entries, every file to its durable content, and what is no
//!   longer reachable from the root is gone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

/// The inode number of the root directory (FUSE's `FUSE_ROOT_ID`).
pub const ROOT: u64 = 1;

/// Granularity of the dirty-page tracking that makes an `fsync` of a large
/// file copy only what changed since the previous one.
const PAGE: u64 = 4096;

/// The whole file system: every inode, reachable or not yet collected.
#[derive(Debug)]
pub struct Model {
    /// Inodes by number. Unlinked inodes stay until the next power loss,
    /// since a durable entry may still point to them.
    nodes: HashMap<u64, Node>,
    /// Never reused, so the kernel never confuses a new inode with a dropped one.
    next_ino: u64,
    /// Counters since the file system was made.
    pub stats: Stats,
}

/// Counters of what the programs asked for and what power losses dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// `fsync`/`fdatasync` of a file.
    pub file_syncs: u64,
    /// `fsync`/`fdatasync` of a directory.
    pub dir_syncs: u64,
    /// Power losses simulated.
    pub power_losses: u64,
}

/// What one power loss dropped, for evidence in test failures.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Loss {
    /// Files whose content reverted, as `(path, bytes before, bytes after)`.
    /// Paths are as of after the loss; files no longer reachable are not listed.
    pub reverted_files: Vec<(String, u64, u64)>,
    /// Directory entries that vanished (created or renamed in, never synced).
    pub dropped_entries: Vec<String>,
    /// Directory entries that came back (removed or renamed away, never synced).
    pub restored_entries: Vec<String>,
}

/// The kind of an inode, as reported to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeType {
    File,
    Dir,
}

/// What `getattr` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeType,
    pub size: u64,
    pub perm: u16,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// Errors are plain errno values, as FUSE answers them.
pub type Errno = i32;

#[derive(Debug)]
struct Node {
    perm: u16,
    mtime: SystemTime,
    ctime: SystemTime,
    body: Body,
}

#[derive(Debug)]
enum Body {
    File {
        /// What programs read.
        data: Vec<u8>,
        /// What survives a power loss.
        durable: Vec<u8>,
        /// Pages of `data` written since the last sync (by page number).
        dirty: BTreeSet<u64>,
    },
    Dir {
        /// What programs see.
        entries: BTreeMap<OsString, u64>,
        /// What survives a power loss.
        durable: BTreeMap<OsString, u64>,
    },
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    /// An empty file system: a root directory whose (empty) listing is durable.
    pub fn new() -> Model {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(0o755, Body::dir()));
        Model {
            nodes,
            next_ino: ROOT + 1,
            stats: Stats::default(),
        }
    }

    /// The attributes of `ino`.
    pub fn attr(&self, ino: u64) -> Result<Attr, Errno> {
        let node = self.node(ino)?;
        let (kind, size) = match &node.body {
            Body::File { data, .. } => (NodeType::File, data.len() as u64),
            Body::Dir { entries, .. } => (NodeType::Dir, entries.len() as u64),
        };
        Ok(Attr {
            ino,
            kind,
            size,
            perm: node.perm,
            mtime: node.mtime,
            ctime: node.ctime,
        })
    }

    /// The inode named `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(parent)?.get(name).copied().ok_or(libc::ENOENT)
    }

    /// Creates an empty file `name` in `parent`.
    pub fn create(&mut self, parent: u64, name: &OsStr, perm: u16) -> Result<u64, Errno> {
        self.add(parent, name, Node::new(perm, Body::file()))
    }

    /// Creates an empty directory `name` in `parent`.
    pub fn mkdir(&mut self, parent: u64, name: &OsStr, perm: u16) -> Result<u64, Errno> {
        self.add(parent, name, Node::new(perm, Body::dir()))
    }

    /// Removes the file `name` from `parent`.
    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        if self.attr(ino)?.kind == NodeType::Dir {
            return Err(libc::EISDIR);
        }
        self.entries_mut(parent)?.remove(name);
        self.touch(parent);
        Ok(())
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        if !self.entries(ino).map_err(|_| libc::ENOTDIR)?.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.entries_mut(parent)?.remove(name);
        self.touch(parent);
        Ok(())
    }

    /// Moves `name` in `parent` to `new_name` in `new_parent`, replacing a
    /// file there unless `no_replace`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        self.entries(new_parent)?;
        if let Ok(existing) = self.lookup(new_parent, new_name) {
            if no_replace {
                return Err(libc::EEXIST);
            }
            if existing == ino {
                return Ok(());
            }
            match (self.attr(ino)?.kind, self.attr(existing)?.kind) {
                (NodeType::Dir, NodeType::File) => return Err(libc::ENOTDIR),
                (NodeType::File, NodeType::Dir) => return Err(libc::EISDIR),
                (NodeType::Dir, NodeType::Dir) if !self.entries(existing)?.is_empty() => {
                    return Err(libc::ENOTEMPTY);
                }
                _ => {}
            }
        }
        self.entries_mut(parent)?.remove(name);
        self.entries_mut(new_parent)?
            .insert(new_name.to_owned(), ino);
        self.touch(parent);
        self.touch(new_parent);
        Ok(())
    }

    /// Up to `size` bytes of file `ino` from `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: usize) -> Result<&[u8], Errno> {
        match &self.node(ino)?.body {
            Body::File { data, .. } => {
                let start = (offset as usize).min(data.len());
                let end = start.saturating_add(size).min(data.len());
                Ok(&data[start..end])
            }
            Body::Dir { .. } => Err(libc::EISDIR),
        }
    }

    /// Writes `bytes` into file `ino` at `offset` (volatile until synced).
    pub fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> Result<usize, Errno> {
        let node = self.node_mut(ino)?;
        let Body::File { data, dirty, .. } = &mut node.body else {
            return Err(libc::EISDIR);
        };
        let start = usize::try_from(offset).map_err(|_| libc::EFBIG)?;
        let end = start.checked_add(bytes.len()).ok_or(libc::EFBIG)?;
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(bytes);
        if !bytes.is_empty() {
            dirty.extend(start as u64 / PAGE..=(end as u64 - 1) / PAGE);
        }
        let now = SystemTime::now();
        node.mtime = now;
        node.ctime = now;
        Ok(bytes.len())
    }

    /// Truncates or extends file `ino` to `len` bytes (volatile until synced).
    pub fn set_len(&mut self, ino: u64, len: u64) -> Result<(), Errno> {
        let node = self.node_mut(ino)?;
        let Body::File { data, dirty, .. } = &mut node.body else {
            return Err(libc::EISDIR);
        };
        let new_len = usize::try_from(len).map_err(|_| libc::EFBIG)?;
        let (low, high) = (data.len().min(new_len), data.len().max(new_len));
        if low < high {
            dirty.extend(low as u64 / PAGE..=(high as u64 - 1) / PAGE);
        }
        data.resize(new_len, 0);
        let now = SystemTime::now();
        node.mtime = now;
        node.ctime = now;
        Ok(())
    }

    /// Sets the permission bits of `ino`.
    pub fn set_perm(&mut self, ino: u64, perm: u16) -> Result<(), Errno> {
        let node = self.node_mut(ino)?;
        node.perm = perm & 0o7777;
        node.ctime = SystemTime::now();
        Ok(())
    }

    /// Sets the modification time of `ino`.
    pub fn set_mtime(&mut self, ino: u64, mtime: SystemTime) -> Result<(), Errno> {
        self.node_mut(ino)?.mtime = mtime;
        Ok(())
    }

    /// `fsync`/`fdatasync` of `ino`: a file's content, or a directory's
    /// entries, become durable. (Both kinds of sync make a file's size
    /// durable, as `fdatasync` must for the data to be readable.)
    pub fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        let node = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        match &mut node.body {
            Body::File {
                data,
                durable,
                dirty,
            } => {
                durable.resize(data.len(), 0);
                for page in std::mem::take(dirty) {
                    let start = (page * PAGE) as usize;
                    if start >= data.len() {
                        break;
                    }
                    let end = (start + PAGE as usize).min(data.len());
                    durable[start..end].copy_from_slice(&data[start..end]);
                }
                self.stats.file_syncs += 1;
            }
            Body::Dir { entries, durable } => {
                durable.clone_from(entries);
                self.stats.dir_syncs += 1;
            }
        }
        Ok(())
    }

    /// A path of `ino` from the root, if it is reachable.
    pub fn path(&self, ino: u64) -> Option<String> {
        self.paths().remove(&ino)
    }

    /// The entries of directory `ino`, in name order.
    pub fn readdir(&self, ino: u64) -> Result<Vec<(OsString, u64, NodeType)>, Errno> {
        self.entries(ino)?
            .iter()
            .map(|(name, &child)| Ok((name.clone(), child, self.attr(child)?.kind)))
            .collect()
    }

    /// Whether anything is not durable: a file with unsynced writes or a
    /// directory whose entries differ from its durable ones.
    pub fn is_clean(&self) -> bool {
        self.nodes.values().all(|node| match &node.body {
            Body::File {
                dirty,
                data,
                durable,
            } => dirty.is_empty() && data.len() == durable.len(),
            Body::Dir { entries, durable } => entries == durable,
        })
    }

    /// Power loss: drops everything not durable (see the module docs) and
    /// says what was dropped.
    pub fn power_loss(&mut self) -> Loss {
        self.power_loss_with(&mut |_| false)
    }

    /// Power loss on a disk whose cache happened to write some of what was
    /// not synced: before the loss, `persist()` decides, for each directory
    /// with unsynced changes (all of them, or none), each unsynced size
    /// change and each unsynced 4 KiB page of each file, whether it reached
    /// stable storage anyway; it is given the path (as of before the loss,
    /// empty for an unreachable inode). The cache writes in any order, so a
    /// program must survive any subset; `|_| false` is [`Model::power_loss`].
    pub fn power_loss_with(&mut self, persist: &mut dyn FnMut(&str) -> bool) -> Loss {
        let paths = self.paths();
        let mut inos: Vec<u64> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let path = paths.get(&ino).map_or("", String::as_str);
            let node = self.nodes.get_mut(&ino).expect("listed above");
            match &mut node.body {
                Body::Dir { entries, durable } => {
                    if entries != durable && persist(path) {
                        durable.clone_from(entries);
                    }
                }
                Body::File {
                    data,
                    durable,
                    dirty,
                } => {
                    if data.len() != durable.len() && persist(path) {
                        durable.resize(data.len(), 0);
                    }
                    for &page in dirty.iter() {
                        let start = (page * PAGE) as usize;
                        let end = (start + PAGE as usize).min(data.len()).min(durable.len());
                        if start < end && persist(path) {
                            durable[start..end].copy_from_slice(&data[start..end]);
                        }
                    }
                }
            }
        }
        let mut loss = Loss::default();
        // Paths as of before the loss, to name what vanished.
        let before = self.paths();
        for (&ino, node) in &mut self.nodes {
            if let Body::Dir { entries, durable } = &mut node.body {
                let dir = before
                    .get(&ino)
                    .cloned()
                    .unwrap_or_else(|| format!("<inode {ino}>"));
                for (name, child) in entries.iter() {
                    if durable.get(name) != Some(child) {
                        loss.dropped_entries.push(join(&dir, name));
                    }
                }
                for (name, child) in durable.iter() {
                    if entries.get(name) != Some(child) {
                        loss.restored_entries.push(join(&dir, name));
                    }
                }
                entries.clone_from(durable);
            }
        }
        let after = self.paths();
        self.nodes.retain(|ino, _| after.contains_key(ino));
        for (&ino, node) in &mut self.nodes {
            if let Body::File {
                data,
                durable,
                dirty,
            } = &mut node.body
            {
                if !dirty.is_empty() || data.len() != durable.len() {
                    loss.reverted_files.push((
                        after[&ino].clone(),
                        data.len() as u64,
                        durable.len() as u64,
                    ));
                }
                data.clone_from(durable);
                dirty.clear();
            }
        }
        loss.reverted_files.sort();
        loss.dropped_entries.sort();
        loss.restored_entries.sort();
        self.stats.power_losses += 1;
        loss
    }

    /// One path for every inode reachable from the root (`/` for the root).
    fn paths(&self) -> HashMap<u64, String> {
        let mut paths = HashMap::from([(ROOT, String::from("/"))]);
        let mut queue = vec![ROOT];
        while let Some(dir) = queue.pop() {
            let Ok(entries) = self.entries(dir) else {
                continue;
            };
            for (name, &child) in entries {
                if !paths.contains_key(&child) {
                    paths.insert(child, join(&paths[&dir], name));
                    queue.push(child);
                }
            }
        }
        paths
    }

    fn add(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64, Errno> {
        if name.is_empty() || name == "." || name == ".." || name.len() > 255 {
            return Err(libc::EINVAL);
        }
        let ino = self.next_ino;
        let entries = self.entries_mut(parent)?;
        if entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        entries.insert(name.to_owned(), ino);
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        self.touch(parent);
        Ok(ino)
    }

    fn touch(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            let now = SystemTime::now();
            node.mtime = now;
            node.ctime = now;
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn entries(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.node(ino)?.body {
            Body::Dir { entries, .. } => Ok(entries),
            Body::File { .. } => Err(libc::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir { entries, .. } => Ok(entries),
            Body::File { .. } => Err(libc::ENOTDIR),
        }
    }
}

impl Node {
    fn new(perm: u16, body: Body) -> Node {
        let now = SystemTime::now();
        Node {
            perm: perm & 0o7777,
            mtime: now,
            ctime: now,
            body,
        }
    }
}

impl Body {
    fn file() -> Body {
        Body::File {
            data: Vec::new(),
            durable: Vec::new(),
            dirty: BTreeSet::new(),
        }
    }

    fn dir() -> Body {
        Body::Dir {
            entries: BTreeMap::new(),
            durable: BTreeMap::new(),
        }
    }
}

fn join(dir: &str, name: &OsStr) -> String {
    let name = name.to_string_lossy();
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    /// A model with `/d` created and made durable in the root.
    fn with_dir() -> (Model, u64) {
        let mut m = Model::new();
        let d = m.mkdir(ROOT, name("d"), 0o755).unwrap();
        m.sync(ROOT).unwrap();
        (m, d)
    }

    fn content(m: &Model, ino: u64) -> Vec<u8> {
        m.read(ino, 0, usize::MAX).unwrap().to_vec()
    }

    #[test]
    fn synced_file_in_synced_directory_survives() {
        let (mut m, d) = with_dir();
        let f = m.create(d, name("f"), 0o644).unwrap();
        m.write(f, 0, b"hello").unwrap();
        m.sync(f).unwrap();
        m.sync(d).unwrap();
        assert!(m.is_clean());
        let loss = m.power_loss();
        assert_eq!(loss, Loss::default());
        assert_eq!(m.lookup(d, name("f")), Ok(f));
        assert_eq!(content(&m, f), b"hello");
    }

    #[test]
    fn synced_file_in_unsynced_directory_disappears() {
        let (mut m, d) = with_dir();
        let f = m.create(d, name("f"), 0o644).unwrap();
        m.write(f, 0, b"hello").unwrap();
        m.sync(f).unwrap();
        assert!(!m.is_clean());
        let loss = m.power_loss();
        assert_eq!(loss.dropped_entries, ["/d/f"]);
        assert_eq!(m.lookup(d, name("f")), Err(libc::ENOENT));
        // The inode is gone too, not just its name.
        assert_eq!(m.attr(f), Err(libc::ENOENT));
    }

    #[test]
    fn unsynced_writes_revert_to_the_last_sync() {
        let (mut m, d) = with_dir();
        let f = m.create(d, name("f"), 0o644).unwrap();
        m.sync(d).unwrap();
        // Never synced: durably empty.
        m.write(f, 0, b"abc").unwrap();
        m.power_loss();
        assert_eq!(content(&m, f), b"");
        m.write(f, 0, b"first").unwrap();
        m.sync(f).unwrap();
        m.write(f, 2, b"XYZ and more").unwrap();
        let loss = m.power_loss();
        assert_eq!(loss.reverted_files, [("/d/f".to_string(), 14, 5)]);
        assert_eq!(content(&m, f), b"first");
    }

    #[test]
    fn sync_copies_every_dirty_page_of_a_large_file() {
        let (mut m, d) = with_dir();
        let f = m.create(d, name("big"), 0o644).unwrap();
        m.sync(d).unwrap();
        let data: Vec<u8> = (0..5 * PAGE as usize + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        m.write(f, 0, &data).unwrap();
        m.sync(f).unwrap();
        // Writes straddling page boundaries, then a sync, then more writes.
        m.write(f, PAGE - 2, b"across").unwrap();
        m.write(f, 3 * PAGE + 100, b"middle").unwrap();
        m.sync(f).unwrap();
        let mut expected = data.clone();
        expected[PAGE as usize - 2..PAGE as usize + 4].copy_from_slice(b"across");
        expected[3 * PAGE as usize + 100..3 * PAGE as usize + 106].copy_from_slice(b"middle");
        m.write(f, 0, b"lost").unwrap();
        m.power_loss();
        assert_eq!(content(&m, f), expected);
    }

    #[test]
    fn truncation_is_volatile_until_synced() {
        let (mut m, d) = with_dir();
        let f = m.create(d, name("f"), 0o644).unwrap();
        m.sync(d).unwrap();
        m.write(f, 0, &[7; 10_000]).unwrap();
        m.sync(f).unwrap();
        m.set_len(f, 10).unwrap();
        m.power_loss();
        assert_eq!(content(&m, f), vec![7; 10_000]);
        m.set_len(f, 10).unwrap();
        m.sync(f).unwrap();
        m.set_len(f, 20_000).unwrap();
        m.write(f, 15_000, b"x").unwrap();
        m.power_loss();
        assert_eq!(content(&m, f), vec![7; 10]);
        // Extending then syncing keeps the zeros.
        m.set_len(f, 5000).unwrap();
        m.sync(f).unwrap();
        m.power_loss();
        let mut expected = vec![7; 10];
        expected.resize(5000, 0);
        assert_eq!(content(&m, f), expected);
    }

    #[test]
    fn renames_are_durable_per_directory() {
        let (mut m, d) = with_dir();
        let e = m.mkdir(ROOT, name("e"), 0o755).unwrap();
        let f = m.create(d, name("tmp"), 0o644).unwrap();
        m.write(f, 0, b"data").unwrap();
        m.sync(f).unwrap();
        m.sync(ROOT).unwrap();
        m.sync(d).unwrap();
        // Rename within d, not synced: the old name comes back.
        m.rename(d, name("tmp"), d, name("final"), false).unwrap();
        let loss = m.power_loss();
        assert_eq!(loss.dropped_entries, ["/d/final"]);
        assert_eq!(loss.restored_entries, ["/d/tmp"]);
        assert_eq!(m.lookup(d, name("tmp")), Ok(f));
        // Across directories, only the target synced: the file is in both.
        m.rename(d, name("tmp"), e, name("moved"), false).unwrap();
        m.sync(e).unwrap();
        m.power_loss();
        assert_eq!(m.lookup(d, name("tmp")), Ok(f));
        assert_eq!(m.lookup(e, name("moved")), Ok(f));
        assert_eq!(content(&m, f), b"data");
    }

    #[test]
    fn rename_over_a_synced_file_and_no_replace() {
        let (mut m, d) = with_dir();
        let old = m.create(d, name("snap"), 0o644).unwrap();
        m.write(old, 0, b"old").unwrap();
        m.sync(old).unwrap();
        let new = m.create(d, name("snap.tmp"), 0o644).unwrap();
        m.write(new, 0, b"new").unwrap();
        m.sync(new).unwrap();
        m.sync(d).unwrap();
        assert_eq!(
            m.rename(d, name("snap.tmp"), d, name("snap"), true),
            Err(libc::EEXIST)
        );
        m.rename(d, name("snap.tmp"), d, name("snap"), false)
            .unwrap();
        assert_eq!(content(&m, m.lookup(d, name("snap")).unwrap()), b"new");
        m.power_loss();
        // The directory was not synced after the rename: the old file is back.
        assert_eq!(content(&m, m.lookup(d, name("snap")).unwrap()), b"old");
        m.rename(d, name("snap.tmp"), d, name("snap"), false)
            .unwrap();
        m.sync(d).unwrap();
        m.power_loss();
        assert_eq!(content(&m, m.lookup(d, name("snap")).unwrap()), b"new");
        assert_eq!(m.lookup(d, name("snap.tmp")), Err(libc::ENOENT));
    }

    #[test]
    fn unlinks_and_rmdirs_are_undone_unless_synced() {
        let (mut m, d) = with_dir();
        let f = m.create(d, name("f"), 0o644).unwrap();
        m.write(f, 0, b"keep").unwrap();
        m.sync(f).unwrap();
        m.sync(d).unwrap();
        m.unlink(d, name("f")).unwrap();
        assert_eq!(m.lookup(d, name("f")), Err(libc::ENOENT));
        let loss = m.power_loss();
        assert_eq!(loss.restored_entries, ["/d/f"]);
        assert_eq!(content(&m, m.lookup(d, name("f")).unwrap()), b"keep");
        m.unlink(d, name("f")).unwrap();
        m.sync(d).unwrap();
        m.power_loss();
        assert_eq!(m.lookup(d, name("f")), Err(libc::ENOENT));
        assert_eq!(m.rmdir(ROOT, name("d")), Ok(()));
        m.power_loss();
        assert_eq!(m.lookup(ROOT, name("d")), Ok(d));
    }

    #[test]
    fn a_new_directory_needs_its_parent_synced() {
        let (mut m, d) = with_dir();
        let sub = m.mkdir(d, name("blobs"), 0o755).unwrap();
        let f = m.create(sub, name("17"), 0o644).unwrap();
        m.write(f, 0, b"blob").unwrap();
        m.sync(f).unwrap();
        m.sync(sub).unwrap();
        // `blobs` itself was never made durable in `d`: everything under it goes.
        let loss = m.power_loss();
        assert_eq!(loss.dropped_entries, ["/d/blobs"]);
        assert_eq!(m.lookup(d, name("blobs")), Err(libc::ENOENT));
        assert_eq!(m.attr(f), Err(libc::ENOENT));
    }

    #[test]
    fn errors_match_posix() {
        let (mut m, d) = with_dir();
        let f = m.create(d, name("f"), 0o644).unwrap();
        assert_eq!(m.create(d, name("f"), 0o644), Err(libc::EEXIST));
        assert_eq!(m.mkdir(d, name("f"), 0o755), Err(libc::EEXIST));
        assert_eq!(m.lookup(f, name("x")), Err(libc::ENOTDIR));
        assert_eq!(m.rmdir(ROOT, name("d")), Err(libc::ENOTEMPTY));
        assert_eq!(m.unlink(ROOT, name("d")), Err(libc::EISDIR));
        assert_eq!(m.unlink(d, name("nope")), Err(libc::ENOENT));
        assert_eq!(m.read(d, 0, 1), Err(libc::EISDIR));
        assert_eq!(
            m.rename(d, name("f"), ROOT, name("d"), false),
            Err(libc::EISDIR)
        );
        assert_eq!(
            m.readdir(d).unwrap(),
            [(OsString::from("f"), f, NodeType::File)]
        );
        assert_eq!(m.read(f, 10, 5).unwrap(), b"");
    }

    #[test]
    fn a_lucky_cache_persists_some_unsynced_changes() {
        let (mut m, d) = with_dir();
        let f = m.create(d, name("f"), 0o644).unwrap();
        m.write(f, 0, &[1; 3 * PAGE as usize]).unwrap();
        m.sync(f).unwrap();
        m.sync(d).unwrap();
        // Unsynced: pages 0 and 2 rewritten, the file grown by a page, a new file.
        m.write(f, 0, &[2; 10]).unwrap();
        m.write(f, 2 * PAGE, &[3; 10]).unwrap();
        m.write(f, 3 * PAGE, &[4; PAGE as usize]).unwrap();
        let g = m.create(d, name("g"), 0o644).unwrap();
        m.write(g, 0, b"g").unwrap();
        // Decisions in inode order: d's entries (kept), f's size (kept),
        // f's pages 0 (dropped), 2 (kept), 3 (dropped), g's size (kept), its page (dropped).
        let mut decisions = [true, true, false, true, false, true, false].into_iter();
        let mut asked = Vec::new();
        let loss = m.power_loss_with(&mut |path| {
            asked.push(path.to_string());
            decisions.next().expect("no more decisions asked")
        });
        assert_eq!(
            asked,
            ["/d", "/d/f", "/d/f", "/d/f", "/d/f", "/d/g", "/d/g"]
        );
        assert_eq!(decisions.next(), None, "every decision used");
        assert_eq!(loss.dropped_entries, Vec::<String>::new());
        let mut expected = vec![1; 3 * PAGE as usize];
        expected[2 * PAGE as usize..2 * PAGE as usize + 10].copy_from_slice(&[3; 10]);
        expected.resize(4 * PAGE as usize, 0);
        assert_eq!(content(&m, f), expected);
        // g's name and size made it, its byte did not: a zero.
        assert_eq!(content(&m, m.lookup(d, name("g")).unwrap()), [0]);
    }

    #[test]
    fn stats_count_syncs_and_losses() {
        let (mut m, d) = with_dir();
        let f = m.create(d, name("f"), 0o644).unwrap();
        m.sync(f).unwrap();
        m.sync(d).unwrap();
        m.power_loss();
        assert_eq!(
            m.stats,
            Stats {
                file_syncs: 1,
                dir_syncs: 2,
                power_losses: 1
            }
        );
    }
}
