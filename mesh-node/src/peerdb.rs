//! The peer cache: a bounded SQLite table of other nodes' prefixes, tunnel
//! keys and endpoints, so that a restarted node reconnects to the peers it
//! knew before asking the registry (which may be down).

use std::net::SocketAddr;
use std::path::Path;

use ipnet::Ipv6Net;
use rusqlite::{Connection, params};

/// Peers kept at most (re6st keeps 200).
pub const MAX_PEERS: usize = 200;

/// A cached peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedPeer {
    pub prefix: Ipv6Net,
    pub key: [u8; 32],
    pub endpoints: Vec<SocketAddr>,
}

/// The cache, in `<state-dir>/peers.db`.
pub struct PeerDb {
    conn: Connection,
}

/// Errors are the database's.
pub type Result<T> = std::result::Result<T, rusqlite::Error>;

impl PeerDb {
    /// Opens (or creates) the cache.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS peer (
                prefix TEXT PRIMARY KEY,
                key BLOB NOT NULL,
                endpoints TEXT NOT NULL,
                seen INTEGER NOT NULL
            )",
        )?;
        Ok(PeerDb { conn })
    }

    /// Remembers or refreshes peers, then trims the table to [`MAX_PEERS`]
    /// (the least recently seen go first).
    pub fn upsert(&mut self, peers: &[CachedPeer], now: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        for p in peers {
            let eps: Vec<String> = p.endpoints.iter().map(ToString::to_string).collect();
            tx.execute(
                "INSERT INTO peer (prefix, key, endpoints, seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(prefix) DO UPDATE SET key = ?2, endpoints = ?3, seen = ?4",
                params![p.prefix.to_string(), &p.key[..], eps.join(","), now],
            )?;
        }
        tx.execute(
            "DELETE FROM peer WHERE prefix NOT IN (SELECT prefix FROM peer ORDER BY seen DESC LIMIT ?1)",
            params![MAX_PEERS as i64],
        )?;
        tx.commit()
    }

    /// Forgets a peer (revoked).
    pub fn remove(&mut self, prefix: &Ipv6Net) -> Result<()> {
        self.conn.execute("DELETE FROM peer WHERE prefix = ?1", params![prefix.to_string()])?;
        Ok(())
    }

    /// All cached peers, most recently seen first. Rows that do not parse
    /// are skipped.
    pub fn all(&self) -> Result<Vec<CachedPeer>> {
        let mut st = self.conn.prepare("SELECT prefix, key, endpoints FROM peer ORDER BY seen DESC")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, String>(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (prefix, key, eps) = row?;
            let (Ok(prefix), Ok(key)) = (prefix.parse::<Ipv6Net>(), <[u8; 32]>::try_from(key)) else {
                continue;
            };
            let endpoints = eps.split(',').filter_map(|e| e.parse().ok()).collect();
            out.push(CachedPeer { prefix, key, endpoints });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u16) -> CachedPeer {
        CachedPeer {
            prefix: format!("fd00:0:0:{i:x}::/64").parse().unwrap(),
            key: [i as u8; 32],
            endpoints: vec![format!("[fd99::{i:x}]:51820").parse().unwrap()],
        }
    }

    #[test]
    fn survives_reopen_is_bounded_and_keeps_the_freshest() {
        let dir = std::env::temp_dir().join(format!("sixmesh-peerdb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("peers.db");
        let _ = std::fs::remove_file(&path);
        {
            let mut db = PeerDb::open(&path).unwrap();
            db.upsert(&[peer(1), peer(2)], 10).unwrap();
            let many: Vec<CachedPeer> = (100..400).map(peer).collect();
            db.upsert(&many, 20).unwrap();
            db.upsert(&[peer(1)], 30).unwrap();
            db.remove(&peer(399).prefix).unwrap();
        }
        let db = PeerDb::open(&path).unwrap();
        let all = db.all().unwrap();
        assert!(all.len() <= MAX_PEERS);
        assert_eq!(all[0], peer(1), "most recently seen first");
        assert!(!all.contains(&peer(2)), "the stalest went");
        assert!(!all.iter().any(|p| p.prefix == peer(399).prefix));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
