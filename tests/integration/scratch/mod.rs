//! A PostgreSQL cluster of a test's own, for fault tests that stop, freeze or restart
//! a server: created on a free port by the test set-up and dropped afterwards, so the
//! main cluster that every other test uses is never disturbed.
//!
//! Needs Debian's `postgresql-common` tools (`pg_createcluster`, `pg_ctlcluster`,
//! `pg_dropcluster`) and root, as CI has.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct ScratchCluster {
    version: String,
    name: String,
    pub port: u16,
}

/// The newest installed PostgreSQL major version (`/etc/postgresql/<version>`).
fn installed_version() -> String {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .expect("PostgreSQL is installed (/etc/postgresql)")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    versions.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
    versions.pop().expect("a PostgreSQL version is installed")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl ScratchCluster {
    /// Creates and starts a cluster with trust authentication on a free port.
    pub fn start() -> Self {
        Self::start_with(&["--auth=trust"])
    }

    /// Creates and starts a cluster; `initdb_args` go to initdb (after `--`).
    pub fn start_with(initdb_args: &[&str]) -> Self {
        Self::create(&[], initdb_args)
    }

    /// Creates and starts a cluster with trust authentication and these server
    /// settings (`name=value`, written to its `postgresql.conf`), for settings only a
    /// start reads, such as `shared_preload_libraries=pg_stat_statements`.
    pub fn start_configured(settings: &[&str]) -> Self {
        Self::create(settings, &["--auth=trust"])
    }

    fn create(settings: &[&str], initdb_args: &[&str]) -> Self {
        let version = installed_version();
        let port = free_port();
        let name = format!("pgcache_scratch_{port}");
        let port_s = port.to_string();
        let mut args = vec![version.as_str(), name.as_str(), "-p", port_s.as_str()];
        // Small and quick: no fsync (nothing here needs to survive a power cut).
        args.extend(["-o", "fsync=off"]);
        for setting in settings {
            args.extend(["-o", setting]);
        }
        args.push("--");
        args.extend(initdb_args);
        run("pg_createcluster", &args);
        let cluster = ScratchCluster {
            version,
            name,
            port,
        };
        cluster.ctl(&["start"]);
        cluster.wait_ready();
        cluster
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn ctl(&self, args: &[&str]) {
        let mut all = vec![
            "--skip-systemctl-redirect",
            self.version.as_str(),
            self.name.as_str(),
        ];
        all.extend(args);
        run("pg_ctlcluster", &all);
    }

    /// Waits until the server accepts connections (at most 30 s).
    pub fn wait_ready(&self) {
        let started = Instant::now();
        let port = self.port.to_string();
        while started.elapsed() < Duration::from_secs(30) {
            let ok = Command::new("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &port])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("scratch cluster on port {port} did not become ready");
    }

    /// Stops the server (`fast`: active connections are terminated).
    pub fn stop(&self) {
        self.ctl(&["stop", "-m", "fast"]);
    }

    /// Starts a stopped server and waits for it.
    pub fn start_again(&self) {
        self.ctl(&["start"]);
        self.wait_ready();
    }

    /// A fast restart: every connection is terminated, the server comes back.
    pub fn restart(&self) {
        self.ctl(&["restart", "-m", "fast"]);
        self.wait_ready();
    }

    /// The process ids of every server process of this cluster.
    fn pids(&self) -> Vec<String> {
        let data_dir = format!("/var/lib/postgresql/{}/{}", self.version, self.name);
        let pidfile = std::fs::read_to_string(format!("{data_dir}/postmaster.pid"))
            .expect("the cluster is running");
        let postmaster = pidfile.lines().next().unwrap().trim().to_owned();
        let children = Command::new("pgrep")
            .args(["-P", &postmaster])
            .output()
            .expect("pgrep");
        let mut pids = vec![postmaster];
        pids.extend(
            String::from_utf8_lossy(&children.stdout)
                .split_whitespace()
                .map(str::to_owned),
        );
        pids
    }

    /// Freezes every server process (SIGSTOP): connections stay open, nothing answers.
    /// Returns the frozen processes, for [`thaw`](Self::thaw).
    pub fn freeze(&self) -> Vec<String> {
        let pids = self.pids();
        let mut args = vec!["-STOP"];
        args.extend(pids.iter().map(String::as_str));
        run("kill", &args);
        pids
    }

    /// Resumes processes frozen by [`freeze`](Self::freeze).
    pub fn thaw(&self, pids: &[String]) {
        let mut args = vec!["-CONT"];
        args.extend(pids.iter().map(String::as_str));
        run("kill", &args);
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        // Thaw anything a failed test left frozen, or `stop` would wait forever.
        if let Ok(pidfile) = std::fs::read_to_string(format!(
            "/var/lib/postgresql/{}/{}/postmaster.pid",
            self.version, self.name
        )) {
            if let Some(postmaster) = pidfile.lines().next() {
                let _ = Command::new("pkill")
                    .args(["-CONT", "-P", postmaster.trim()])
                    .status();
                let _ = Command::new("kill")
                    .args(["-CONT", postmaster.trim()])
                    .status();
            }
        }
        let _ = Command::new("pg_dropcluster")
            .args(["--stop", &self.version, &self.name])
            .output();
    }
}
