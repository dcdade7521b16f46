//! A TCP proxy in front of the test server that holds every reply for a while, for
//! tests of what a slow path back from the server does (a late poll reply).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Forwards connections on its own port to the test server; what the server sends
/// reaches the client `reply_delay` later, what the client sends goes at once.
pub struct DelayProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

/// The host and port as written in `database_url` (`host`, `host:port`).
fn authority(database_url: &str) -> &str {
    let rest = database_url
        .split_once("://")
        .map_or(database_url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    authority.rsplit('@').next().unwrap_or_default()
}

/// The test server's address, from the database URL the tests use.
fn upstream(database_url: &str) -> String {
    match authority(database_url).replace("localhost", "127.0.0.1") {
        empty if empty.is_empty() => "127.0.0.1:5432".to_owned(),
        with_port if with_port.contains(':') => with_port,
        host => format!("{host}:5432"),
    }
}

impl DelayProxy {
    /// Starts the proxy for `database_url`'s server.
    pub fn start(database_url: &str, reply_delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free local port");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let server = upstream(database_url);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(&server)) else {
                    continue;
                };
                forward(client, server, reply_delay);
            }
        });
        DelayProxy { port, stop }
    }

    /// `database_url` with its host and port replaced by the proxy's.
    pub fn url(&self, database_url: &str) -> String {
        database_url.replacen(
            authority(database_url),
            &format!("127.0.0.1:{}", self.port),
            1,
        )
    }
}

/// Copies client to server at once, and server to client `delay` after each chunk
/// arrived; either side closing closes both.
fn forward(client: TcpStream, server: TcpStream, delay: Duration) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_in, mut server_out) =
        (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_in, &mut server_out);
        let _ = server_out.shutdown(Shutdown::Both);
        let _ = client_in.shutdown(Shutdown::Both);
    });
    let (chunks, held) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut server_in = server;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match server_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if chunks.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = server_in.shutdown(Shutdown::Both);
    });
    let mut client_out = client;
    std::thread::spawn(move || {
        for (arrived, chunk) in held {
            std::thread::sleep((arrived + delay).saturating_duration_since(Instant::now()));
            if client_out.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = client_out.shutdown(Shutdown::Both);
    });
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag and ends.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
