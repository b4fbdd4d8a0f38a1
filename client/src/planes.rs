//! The three planes every cellbank process serves, each on its own
//! listener with its own allowed identities.
//!
//! A process is known by one address, `host:P` (the topology's `listen`,
//! the routing table's replica addresses, Raft's address book, the leader
//! hints in refusals). It serves:
//!
//! | plane | port | what | who may connect |
//! |---|---|---|---|
//! | client | P | `cellbank.v1.Ledger`, health, reflection | services and operators (routers, replicas: routers and operators) |
//! | peer | P+1 | Raft, the standby stream, credits (`Clearing`, `Courier`) | replicas and routers |
//! | admin | P+2 | `ReplicaAdmin`, `RouterAdmin`, fault points, health | routers and operators |
//!
//! Which identities a plane's listener lets finish a connection follows
//! from the process's policy ([`crate::gate::Policy::admits_connection`]);
//! a call to a path served on another plane is refused naming the plane
//! that serves it. Callers name the process and the plane; the port is
//! derived here and nowhere else.

use std::net::SocketAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Plane {
    /// The public ledger API.
    Client,
    /// Traffic between the cluster's processes.
    Peer,
    /// Operators' and the routers' control calls.
    Admin,
}

/// Ports a process takes past its address's: P+1 and P+2.
pub const PORTS_PER_PROCESS: u16 = 3;

impl Plane {
    pub const ALL: [Plane; 3] = [Plane::Client, Plane::Peer, Plane::Admin];

    /// How far this plane's port is from the process's.
    pub const fn offset(self) -> u16 {
        match self {
            Plane::Client => 0,
            Plane::Peer => 1,
            Plane::Admin => 2,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Plane::Client => "client",
            Plane::Peer => "peer",
            Plane::Admin => "admin",
        }
    }

    /// This plane's address of the process at `addr` (`host:port`). An
    /// address that is not `host:port` with room for the planes' ports
    /// comes back as it is with a suffix that no endpoint accepts, so the
    /// caller's connect fails naming it (configurations are checked with
    /// [`check_process_addr`] when they are read).
    pub fn of(self, addr: &str) -> String {
        match split(addr) {
            Ok((host, port)) => format!("{host}:{}", port + self.offset()),
            Err(_) => format!("{addr} (no {} plane: not host:port)", self.name()),
        }
    }

    /// The socket address this plane listens on, for a process bound at
    /// `listen`.
    pub fn listen(self, listen: SocketAddr) -> SocketAddr {
        SocketAddr::new(listen.ip(), listen.port() + self.offset())
    }
}

impl std::fmt::Display for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn split(addr: &str) -> Result<(&str, u16), String> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("{addr:?} is not host:port"))?;
    let port: u16 = port.parse().map_err(|_| format!("{addr:?}: the port is not a number up to 65535"))?;
    if host.is_empty() {
        return Err(format!("{addr:?} has no host"));
    }
    if port == 0 {
        return Err(format!("{addr:?}: a process needs a fixed port (its planes take the next two)"));
    }
    if port > u16::MAX - (PORTS_PER_PROCESS - 1) {
        return Err(format!("{addr:?}: the port must leave room for the peer and admin planes (at most 65533)"));
    }
    Ok((host, port))
}

/// Whether `addr` can name a process: `host:port` with a fixed port that
/// leaves room for its peer and admin planes.
pub fn check_process_addr(addr: &str) -> Result<(), String> {
    split(addr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_are_the_next_ports_of_the_process() {
        assert_eq!(Plane::Client.of("127.0.0.1:7110"), "127.0.0.1:7110");
        assert_eq!(Plane::Peer.of("127.0.0.1:7110"), "127.0.0.1:7111");
        assert_eq!(Plane::Admin.of("cell-1.example:7110"), "cell-1.example:7112");
        assert_eq!(Plane::Admin.of("[::1]:7110"), "[::1]:7112");
        let listen: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        assert_eq!(Plane::Peer.listen(listen), "0.0.0.0:7001".parse().unwrap());
    }

    #[test]
    fn an_address_without_room_for_the_planes_is_refused() {
        for bad in ["127.0.0.1:0", "127.0.0.1:65534", "127.0.0.1", ":7000", "127.0.0.1:x", "127.0.0.1:70000"] {
            assert!(check_process_addr(bad).is_err(), "{bad}");
            assert!(Plane::Peer.of(bad).contains("no peer plane"), "{bad}");
        }
        assert!(check_process_addr("127.0.0.1:65533").is_ok());
    }
}
