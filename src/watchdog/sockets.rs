//! Which socket a connection talks to the server on, and the one place pgcache
//! shuts down a descriptor it did not open itself.
//!
//! libpq opens the socket and Diesel does not expose it. So the socket is found as
//! the connection is made: the process's open sockets are listed (`/proc/self/fd`,
//! each descriptor with its socket's inode, so a number reused by another socket
//! counts as new) before and after the connection is opened, and the one new socket
//! whose peer is the configured server (its host and port, or its Unix-domain
//! socket's path) is the connection's. Anything else is ambiguous (another thread
//! opened a socket to the same server at the same moment, the peer is not the
//! configured one, `/proc` is not readable) and the connection is simply not
//! watched: it then waits for the server however long, as any libpq client does.
//! The caller makes sure the connection's socket was opened after the first
//! listing and is open at the second, so that it is among the new ones (see
//! `Watchdog::adopt` and `Watchdog::open`): a single new one is then certainly it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use crate::database_url::DatabaseUrl;

/// A descriptor and the inode of the socket it held when it was listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Socket {
    fd: i32,
    inode: u64,
}

/// The process's open sockets at one moment.
pub(crate) type Sockets = HashSet<Socket>;

/// Lists the process's open sockets; `None` where `/proc/self/fd` cannot be read
/// (not Linux, or a restricted `/proc`).
pub(crate) fn list() -> Option<Sockets> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let fd = entry.file_name().to_str()?.parse().ok()?;
                let inode = inode_of(&std::fs::read_link(entry.path()).ok()?)?;
                Some(Socket { fd, inode })
            })
            .collect(),
    )
}

/// The inode of a `/proc/self/fd` link's target when it is a socket
/// (`socket:[12345]`).
fn inode_of(target: &std::path::Path) -> Option<u64> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Whether `socket` is still open under the same descriptor.
fn still_open(socket: Socket) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", socket.fd))
        .ok()
        .and_then(|target| inode_of(&target))
        == Some(socket.inode)
}

/// The addresses a connection to the configured server may have as its peer.
#[derive(Debug, Default)]
pub(crate) struct Server {
    tcp: Vec<SocketAddr>,
    /// Unix-domain socket paths (`<dir>/.s.PGSQL.<port>`).
    unix: Vec<PathBuf>,
    /// Ports of hosts left to libpq's default socket directory.
    default_dir_ports: Vec<u16>,
}

impl Server {
    /// The server `url` names, its host names resolved now (a name that does not
    /// resolve contributes nothing: its connections are not watched).
    pub(crate) fn of(url: &DatabaseUrl) -> Self {
        let mut server = Server::default();
        for (host, port) in url.servers() {
            if host.is_empty() {
                server.default_dir_ports.push(port);
            } else if host.starts_with('/') {
                server
                    .unix
                    .push(PathBuf::from(format!("{host}/.s.PGSQL.{port}")));
            } else if let Ok(addrs) = (host.as_str(), port).to_socket_addrs() {
                server.tcp.extend(addrs);
            }
        }
        server
    }

    /// Whether the peer of `fd` is this server.
    #[cfg(target_os = "linux")]
    fn is_peer_of(&self, fd: i32) -> bool {
        use nix::sys::socket::{getpeername, SockaddrStorage};
        let Ok(peer) = getpeername::<SockaddrStorage>(fd) else {
            return false;
        };
        if let Some(unix) = peer.as_unix_addr() {
            let Some(path) = unix.path() else {
                return false;
            };
            let suffix = |port: &u16| {
                path.file_name()
                    .is_some_and(|name| name.to_str() == Some(&format!(".s.PGSQL.{port}")))
            };
            return self.unix.iter().any(|p| p == path)
                || self.default_dir_ports.iter().any(suffix);
        }
        let addr = match (peer.as_sockaddr_in(), peer.as_sockaddr_in6()) {
            (Some(v4), _) => SocketAddr::from((IpAddr::from(v4.ip()), v4.port())),
            (_, Some(v6)) => SocketAddr::from((IpAddr::from(v6.ip()), v6.port())),
            _ => return false,
        };
        self.tcp.iter().any(|a| same(*a, addr))
    }

    #[cfg(not(target_os = "linux"))]
    fn is_peer_of(&self, _fd: i32) -> bool {
        false
    }

    /// The one socket opened between `before` and `after` whose peer is this
    /// server; `None` when there is none or more than one.
    pub(crate) fn new_socket(&self, before: &Sockets, after: &Sockets) -> Option<Socket> {
        let mut new = after
            .difference(before)
            .filter(|socket| self.is_peer_of(socket.fd));
        let socket = *new.next()?;
        new.next().is_none().then_some(socket)
    }
}

/// The same address, an IPv4 one also when written IPv4-mapped.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// Shuts down `socket`, the socket of a connection of pgcache's whose statement the
/// server left unanswered: libpq, blocked waiting for the answer, sees the end of
/// the stream. This is the only place pgcache acts on a descriptor libpq opened;
/// it acts only on a socket recorded as a connection's when that connection was
/// made, and only if the descriptor still holds that socket (a connection that
/// closed its socket and a descriptor number since reused are left alone).
/// `shutdown` rather than `close`: the descriptor stays libpq's, which closes it
/// when the connection is dropped. Whether it did.
#[cfg(target_os = "linux")]
pub(crate) fn cut(socket: Socket) -> bool {
    use nix::sys::socket::{shutdown, Shutdown};
    if !still_open(socket) {
        return false;
    }
    match shutdown(socket.fd, Shutdown::Both) {
        Ok(()) => true,
        Err(errno) => {
            tracing::warn!(%errno, "pgcache: cannot shut down the socket of an unanswered statement");
            false
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn cut(_socket: Socket) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn server_at(addr: SocketAddr) -> Server {
        Server {
            tcp: vec![addr],
            ..Server::default()
        }
    }

    /// Lists the sockets, binds a listener, runs `open` against it and lists them
    /// again: what `new_socket` then picks for a server at the listener's address,
    /// with the listener and what `open` returned (still open). `None` where this
    /// system's sockets cannot be listed.
    fn pick_new_socket<T>(
        open: impl FnOnce(&TcpListener) -> T,
    ) -> Option<(Option<Socket>, TcpListener, T)> {
        let before = list()?;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let opened = open(&listener);
        let after = list().unwrap();
        let picked = server_at(listener.local_addr().unwrap()).new_socket(&before, &after);
        Some((picked, listener, opened))
    }

    /// Asserts that `new_socket` picks no socket among those `open` opens.
    fn assert_none_picked<T>(open: impl FnOnce(&TcpListener) -> T) {
        if let Some((picked, _listener, _opened)) = pick_new_socket(open) {
            assert_eq!(picked, None);
        }
    }

    #[test]
    fn the_one_new_socket_to_the_server_is_found() {
        let Some((found, _listener, (stream, _accepted))) = pick_new_socket(|listener| {
            let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (stream, listener.accept().unwrap().0)
        }) else {
            return;
        };
        let found = found.expect("the connection's socket");
        assert_eq!(found.fd, std::os::fd::AsRawFd::as_raw_fd(&stream));
    }

    #[test]
    fn two_new_sockets_to_the_server_are_ambiguous_and_neither_is_chosen() {
        assert_none_picked(|listener| {
            let addr = listener.local_addr().unwrap();
            (
                TcpStream::connect(addr).unwrap(),
                TcpStream::connect(addr).unwrap(),
            )
        });
    }

    #[test]
    fn a_new_socket_to_another_peer_is_not_the_connection() {
        assert_none_picked(|_| {
            let other = TcpListener::bind("127.0.0.1:0").unwrap();
            let stream = TcpStream::connect(other.local_addr().unwrap()).unwrap();
            (other, stream)
        });
    }

    #[test]
    fn a_socket_no_longer_open_under_its_descriptor_is_never_cut() {
        let Some((socket, listener, stream)) = pick_new_socket(|listener| {
            let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            drop(listener.accept().unwrap());
            stream
        }) else {
            return;
        };
        let socket = socket.unwrap();
        drop(stream);
        assert!(!cut(socket), "a closed socket was cut");
        // The same descriptor number, now another socket's, is left alone.
        let reused = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        assert!(!cut(socket));
        std::io::Write::write_all(&mut accepted, b"x").unwrap();
        let mut byte = [0; 1];
        assert_eq!(
            std::io::Read::read(&mut &reused, &mut byte).unwrap(),
            1,
            "the other socket was shut down"
        );
    }
}
