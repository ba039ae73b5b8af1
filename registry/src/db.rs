//! The SQLite database: opening (WAL, `synchronous=FULL`), schema migrations,
//! and the free-prefix tree.
//!
//! # The prefix tree
//! Table `prefixes` holds a set of rows that, together, cover the whole
//! network exactly once: each row is a prefix (its bits relative to the
//! network prefix) that is either `free` or `used` by a node. It starts as one
//! free row `''` (the whole network). [`allocate`] takes the longest free row
//! that is not longer than the wanted length and splits it down, keeping the
//! `0` branch and leaving each `1` sibling free; [`release`] frees a row and
//! merges it with its free sibling, repeatedly, up the tree.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};

/// The schema, one migration per entry; `PRAGMA user_version` counts how many
/// were applied.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    r#"
    CREATE TABLE config (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;
    CREATE TABLE nodes (
        id             INTEGER PRIMARY KEY,
        bits           TEXT NOT NULL,
        prefix         TEXT NOT NULL,
        kind           TEXT NOT NULL CHECK (kind IN ('sixmesh', 're6st')),
        email          TEXT,
        tunnel_key     TEXT,
        status         TEXT NOT NULL CHECK (status IN ('active', 'revoked', 'expired')),
        current_serial TEXT,
        not_after      INTEGER NOT NULL,
        created_at     INTEGER NOT NULL,
        released_at    INTEGER
    ) STRICT;
    CREATE UNIQUE INDEX nodes_live_bits ON nodes(bits) WHERE status = 'active';
    CREATE TABLE prefixes (
        bits    TEXT PRIMARY KEY,
        state   TEXT NOT NULL CHECK (state IN ('free', 'used')),
        node_id INTEGER REFERENCES nodes(id),
        CHECK ((state = 'used') = (node_id IS NOT NULL))
    ) STRICT;
    CREATE INDEX prefixes_free ON prefixes(state, length(bits));
    CREATE TABLE certs (
        serial     TEXT PRIMARY KEY,
        node_id    INTEGER NOT NULL REFERENCES nodes(id),
        cn         TEXT NOT NULL,
        not_before INTEGER NOT NULL,
        not_after  INTEGER NOT NULL,
        issued_at  INTEGER NOT NULL,
        reason     TEXT NOT NULL CHECK (reason IN ('enroll', 'renew')),
        pem        TEXT NOT NULL,
        revoked_at INTEGER
    ) STRICT;
    CREATE INDEX certs_node ON certs(node_id);
    CREATE INDEX certs_revoked ON certs(revoked_at) WHERE revoked_at IS NOT NULL;
    CREATE TABLE tokens (
        hash         TEXT PRIMARY KEY,
        email        TEXT,
        prefix_len   INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL,
        used_at      INTEGER,
        used_by_node INTEGER REFERENCES nodes(id)
    ) STRICT;
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      INTEGER NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail  TEXT NOT NULL
    ) STRICT;
    CREATE TRIGGER audit_append_only_u BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit table is append-only'); END;
    CREATE TRIGGER audit_append_only_d BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit table is append-only'); END;
    CREATE TABLE netconfig (
        version    INTEGER PRIMARY KEY,
        created_at INTEGER NOT NULL,
        document   TEXT NOT NULL
    ) STRICT;
    CREATE TABLE endpoints (
        node_id     INTEGER PRIMARY KEY REFERENCES nodes(id),
        endpoints   TEXT NOT NULL,
        reported_at INTEGER NOT NULL
    ) STRICT;
    INSERT INTO prefixes (bits, state) VALUES ('', 'free');
    "#,
    // 2: administrators' client certificates (admin API over mTLS)
    r#"
    CREATE TABLE admins (
        serial     TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        pem        TEXT NOT NULL,
        issued_at  INTEGER NOT NULL,
        not_after  INTEGER NOT NULL,
        revoked_at INTEGER
    ) STRICT;
    CREATE INDEX admins_name ON admins(name);
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Opens (creating if `create`) the database at `path`, sets WAL and
/// `synchronous=FULL`, and applies pending migrations.
pub fn open(path: &Path, create: bool) -> Result<Connection> {
    use rusqlite::OpenFlags;
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags)?;
    configure(&conn)?;
    migrate(&conn)?;
    Ok(conn)
}

/// An in-memory database with the schema applied (tests, property tests).
pub fn open_in_memory() -> Result<Connection> {
    let conn = Connection::open_in_memory()?;
    configure(&conn)?;
    migrate(&conn)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // journal_mode answers with a row; in-memory databases answer "memory".
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    Ok(())
}

fn migrate(conn: &Connection) -> Result<()> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if current > SCHEMA_VERSION {
        return Err(Error::Conflict(format!(
            "the database has schema version {current}, newer than this sixmesh ({SCHEMA_VERSION}): upgrade sixmesh"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {}; COMMIT;", i + 1))
            .inspect_err(|_| {
                let _ = conn.execute_batch("ROLLBACK");
            })?;
    }
    Ok(())
}

/// Reads a `config` value.
pub fn get_config(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn.query_row("SELECT value FROM config WHERE key = ?1", [key], |r| r.get(0)).optional()?)
}

/// Writes a `config` value.
pub fn set_config(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO config (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

/// Appends an audit record.
pub fn audit(
    conn: &Connection,
    now: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO audit (at, actor, action, subject, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now, actor, action, subject, detail],
    )?;
    Ok(())
}

/// Allocates a free prefix of `want` bits (relative to the network) for
/// `node_id`, splitting the tree as needed. Must run inside a transaction.
pub fn allocate(conn: &Connection, want: usize, node_id: i64) -> Result<String> {
    let found: Option<String> = conn
        .query_row(
            "SELECT bits FROM prefixes WHERE state = 'free' AND length(bits) <= ?1
             ORDER BY length(bits) DESC, bits LIMIT 1",
            [want as i64],
            |r| r.get(0),
        )
        .optional()?;
    let Some(mut bits) = found else {
        return Err(Error::Exhausted(0));
    };
    while bits.len() < want {
        let zero = format!("{bits}0");
        let one = format!("{bits}1");
        conn.execute("UPDATE prefixes SET bits = ?1 WHERE bits = ?2", params![zero, bits])?;
        conn.execute("INSERT INTO prefixes (bits, state) VALUES (?1, 'free')", [&one])?;
        bits = zero;
    }
    conn.execute("UPDATE prefixes SET state = 'used', node_id = ?1 WHERE bits = ?2", params![node_id, bits])?;
    Ok(bits)
}

/// Frees the prefix `bits` and merges free siblings up the tree. Must run
/// inside a transaction. Freeing a prefix that is not used is an error.
pub fn release(conn: &Connection, bits: &str) -> Result<()> {
    let n = conn.execute(
        "UPDATE prefixes SET state = 'free', node_id = NULL WHERE bits = ?1 AND state = 'used'",
        [bits],
    )?;
    if n != 1 {
        return Err(Error::Internal(format!("prefix {bits:?} is not allocated")));
    }
    let mut bits = bits.to_string();
    while let Some(last) = bits.pop() {
        let sibling = format!("{bits}{}", if last == '0' { '1' } else { '0' });
        let me = format!("{bits}{last}");
        let sibling_free: bool = conn
            .query_row("SELECT state = 'free' FROM prefixes WHERE bits = ?1", [&sibling], |r| r.get(0))
            .optional()?
            .unwrap_or(false);
        if !sibling_free {
            break;
        }
        conn.execute("DELETE FROM prefixes WHERE bits = ?1", [&sibling])?;
        conn.execute("UPDATE prefixes SET bits = ?1 WHERE bits = ?2", params![bits, me])?;
    }
    Ok(())
}

/// The rows of the prefix tree: `(bits, used)`, for checks and `registry show`.
pub fn tree_rows(conn: &Connection) -> Result<Vec<(String, bool)>> {
    let mut st = conn.prepare("SELECT bits, state = 'used' FROM prefixes ORDER BY bits")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(conn: &Connection) -> i64 {
        conn.execute(
            "INSERT INTO nodes (bits, prefix, kind, status, not_after, created_at) VALUES ('?', '?', 'sixmesh', 'revoked', 0, 0)",
            [],
        )
        .unwrap();
        conn.last_insert_rowid()
    }

    #[test]
    fn split_then_merge_back_to_the_root() {
        let conn = open_in_memory().unwrap();
        let a = allocate(&conn, 4, node(&conn)).unwrap();
        let b = allocate(&conn, 4, node(&conn)).unwrap();
        let c = allocate(&conn, 2, node(&conn)).unwrap();
        assert_eq!((a.as_str(), b.as_str(), c.as_str()), ("0000", "0001", "01"));
        release(&conn, &a).unwrap();
        release(&conn, &c).unwrap();
        release(&conn, &b).unwrap();
        assert_eq!(tree_rows(&conn).unwrap(), vec![(String::new(), false)]);
        assert!(release(&conn, "0").is_err(), "double free is refused");
    }

    #[test]
    fn exhaustion_is_reported() {
        let conn = open_in_memory().unwrap();
        allocate(&conn, 1, node(&conn)).unwrap();
        allocate(&conn, 1, node(&conn)).unwrap();
        assert!(matches!(allocate(&conn, 3, node(&conn)), Err(Error::Exhausted(_))));
    }

    #[test]
    fn migrations_are_idempotent_on_reopen() {
        let dir = std::env::temp_dir().join(format!("smreg-db-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.db");
        drop(open(&p, true).unwrap());
        let conn = open(&p, false).unwrap();
        let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v as usize, SCHEMA_VERSION);
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        drop(conn);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn audit_is_append_only() {
        let conn = open_in_memory().unwrap();
        audit(&conn, 1, "test", "x", "y", "z").unwrap();
        assert!(conn.execute("DELETE FROM audit", []).is_err());
        assert!(conn.execute("UPDATE audit SET actor = 'evil'", []).is_err());
    }
}
