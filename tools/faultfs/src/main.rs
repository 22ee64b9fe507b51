//! `faultfs MOUNTPOINT`: mounts an empty faultfs and reads commands from
//! standard input, one a line: `power-loss` (prints what was dropped),
//! `stats`; end of input unmounts and exits.

use std::io::BufRead;

fn main() {
    let Some(mountpoint) = std::env::args_os().nth(1) else {
        eprintln!("usage: faultfs MOUNTPOINT  (then `power-loss` or `stats` lines on stdin)");
        std::process::exit(2);
    };
    let mounted = match faultfs::Mounted::mount(mountpoint.as_ref()) {
        Ok(mounted) => mounted,
        Err(e) => {
            eprintln!(
                "faultfs: cannot mount on {}: {e}",
                mountpoint.to_string_lossy()
            );
            std::process::exit(1);
        }
    };
    for line in std::io::stdin().lock().lines() {
        match line.as_deref().map(str::trim) {
            Ok("power-loss") => println!("{:?}", mounted.power_loss()),
            Ok("stats") => println!("{:?}", mounted.stats()),
            Ok("") => {}
            Ok(other) => eprintln!("faultfs: unknown command {other:?}"),
            Err(_) => break,
        }
    }
    if let Err(e) = mounted.unmount() {
        eprintln!("faultfs: unmount failed: {e}");
        std::process::exit(1);
    }
}
