//! A private NATS server with JetStream (`/usr/sbin/nats-server`) that a
//! test can kill -9 and start again on the same port and store, as an
//! outage of the cluster's bus would look to every node at once.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

const NATS_SERVER: &str = "/usr/sbin/nats-server";

pub struct NatsServer {
    pub addr: SocketAddr,
    /// Holds the JetStream store (and the server's log), kept across restarts.
    dir: tempfile::TempDir,
    child: Option<Child>,
    runs: u32,
}

impl NatsServer {
    /// Starts a server on a free port with a fresh store and waits until
    /// it accepts connections (it starts JetStream before it listens).
    pub fn start() -> NatsServer {
        let mut nats = NatsServer {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            runs: 0,
        };
        nats.restart();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Kills the server with SIGKILL (no flush, no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on the same port and store; waits until
    /// it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "nats-server is still running");
        let log = self.dir.path().join(format!("nats-{}.log", self.runs));
        self.runs += 1;
        let child = Command::new(NATS_SERVER)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.addr.port().to_string(),
            ])
            .arg("-sd")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.addr).is_err() {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "nats-server did not come up on {} ({exited:?}); its log:\n{}",
                self.addr,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
