//! Running the real flagwrite binary: a child process on a free loopback
//! port, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A flagwrite process.
pub struct Process {
    pub child: Child,
    pub addr: std::net::SocketAddr,
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Process {
    /// Starts flagwrite with `args` on a fresh port and waits until it accepts connections.
    // The child is killed and waited for in `Drop`.
    #[allow(clippy::zombie_processes)]
    pub fn start(data_dir: &std::path::Path, args: &[&str]) -> Process {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flagwrite"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start flagwrite");
        for _ in 0..500 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Process { child, addr };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("flagwrite did not listen on {addr}");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        for _ in 0..500 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("flagwrite did not stop after SIGTERM");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
