//! A PgBouncer of a test's own in transaction mode, in front of the test server
//! (`127.0.0.1:5432`): started on a free port with its configuration, log and
//! socket in a directory of its own, stopped and its files removed when dropped
//! (also when the test panics), so nothing is left running.
//!
//! Needs Debian's `pgbouncer` package (`.ci/run` installs it) and root, as CI has:
//! PgBouncer refuses to run as root, so it is started with `-u postgres`, and drops
//! to that user itself (one process, the one the harness stops).
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Server connections PgBouncer keeps per user and database: fewer than a
/// manager's pool, so clients share them, as in production.
pub const SERVER_CONNECTIONS: u32 = 4;

pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

impl PgBouncer {
    /// Starts PgBouncer with `pool_mode = transaction` for every database of the
    /// test server, letting in `users` (and `postgres`) without a password; each
    /// logs in to the server as itself (the server trusts local connections).
    pub fn start(users: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("pgcache_pgbouncer_{port}"));
        std::fs::create_dir_all(&dir).expect("PgBouncer's directory");
        let mut auth = String::from("\"postgres\" \"\"\n");
        for user in users {
            auth.push_str(&format!("\"{user}\" \"\"\n"));
        }
        std::fs::write(dir.join("users.txt"), auth).unwrap();
        let ini = format!(
            "[databases]\n\
             * = host=127.0.0.1 port=5432\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir = {dir}\n\
             logfile = {dir}/pgbouncer.log\n\
             auth_type = trust\n\
             auth_file = {dir}/users.txt\n\
             admin_users = postgres\n\
             pool_mode = transaction\n\
             default_pool_size = {SERVER_CONNECTIONS}\n\
             max_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits,options\n",
            dir = dir.display(),
        );
        let config = dir.join("pgbouncer.ini");
        std::fs::write(&config, ini).unwrap();
        let chown = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(chown.success(), "chown of PgBouncer's directory failed");
        let child = Command::new("pgbouncer")
            .args(["-u", "postgres"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbouncer is installed (Debian package `pgbouncer`)");
        let mut bouncer = PgBouncer { port, dir, child };
        bouncer.wait_ready();
        bouncer
    }

    /// Waits until PgBouncer accepts connections (at most 30 s).
    fn wait_ready(&mut self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("pgbouncer exited ({status}): {}", self.log());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "pgbouncer on port {} did not start: {}",
            self.port,
            self.log()
        );
    }

    /// PgBouncer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// `postgres://<user>@127.0.0.1:<port>/<database>` through PgBouncer.
    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
