//! The TLS bridge against real stunnel4, both directions, carrying a line
//! echo end to end, resuming TLS sessions both ways; and the refusals (plain TCP, unknown CA, revoked
//! certificate), each with a logged reason; the reload of the config file without dropping open
//! connections; half-close, idle timeout and connection limit. Loopback only: no root needed.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sixmesh_tests::sixmesh_bin;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh").arg("-ec").arg(script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, two certificates signed by it (ours, theirs: IP ::1, server and
/// client use), one revoked (its CRL), and a certificate of another CA.
fn pki(dir: &Path) {
    sh(
        dir,
        r#"
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=test-ca" -out ca.pem
        printf 'subjectAltName=IP:::1,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > ext
        for n in ours theirs revoked; do
          openssl ecparam -name prime256v1 -genkey -noout -out $n.key
          openssl req -new -key $n.key -subj "/CN=$n" -out $n.csr
          openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 -extfile ext -out $n.pem
        done
        # CRL revoking "revoked"
        mkdir -p db && : > db/index.txt && echo 01 > db/crlnumber
        printf '[ca]\ndefault_ca=c\n[c]\ndatabase=db/index.txt\ncrlnumber=db/crlnumber\ndefault_md=sha256\ndefault_crl_days=2\n' > ca.cnf
        openssl ca -config ca.cnf -keyfile ca.key -cert ca.pem -revoke revoked.pem 2>/dev/null
        openssl ca -config ca.cnf -keyfile ca.key -cert ca.pem -gencrl -out crl.pem 2>/dev/null
        # an expired certificate of the right CA
        mkdir -p newcerts
        printf '[ca]\ndefault_ca=c\n[c]\ndatabase=db/index.txt\nnew_certs_dir=newcerts\nserial=db/serial\ndefault_md=sha256\npolicy=p\ncopy_extensions=copy\n[p]\ncommonName=supplied\n' > old.cnf
        echo 1000 > db/serial
        openssl ecparam -name prime256v1 -genkey -noout -out expired.key
        openssl req -new -key expired.key -subj "/CN=expired" -out expired.csr
        openssl ca -batch -config old.cnf -keyfile ca.key -cert ca.pem -in expired.csr -out expired.pem \
            -startdate 20200101000000Z -enddate 20200102000000Z -extfile ext 2>/dev/null
        # another CA
        openssl ecparam -name prime256v1 -genkey -noout -out other-ca.key
        openssl req -x509 -new -key other-ca.key -sha256 -days 2 -subj "/CN=other-ca" -out other-ca.pem
        openssl ecparam -name prime256v1 -genkey -noout -out stranger.key
        openssl req -new -key stranger.key -subj "/CN=stranger" -out stranger.csr
        openssl x509 -req -in stranger.csr -CA other-ca.pem -CAkey other-ca.key -CAcreateserial -days 2 -sha256 -extfile ext -out stranger.pem
        "#,
    );
}

/// A line-echo server on loopback; returns its port.
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    if writeln!(w, "{line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Sends a line to 127.0.0.1:port and returns the echoed line, retrying
/// for 5 s while the daemons start.
fn ask(port: u16, line: &str) -> std::io::Result<String> {
    let start = Instant::now();
    let once = || -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        writeln!(s, "{line}")?;
        let mut out = String::new();
        BufReader::new(s).read_line(&mut out)?;
        if out.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(out.trim_end().to_string())
    };
    loop {
        match once() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > Duration::from_secs(5) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stunnel(dir: &Path, name: &str, conf: &str) -> Killed {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(
        &path,
        format!("foreground = yes\npid =\ndebug = warning\noutput = {}/{name}.log\n{conf}", dir.display()),
    )
    .unwrap();
    Killed(
        Command::new("stunnel")
            .arg(&path)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel (apt-get install stunnel4)"),
    )
}

fn openssl_client(dir: &Path, port: u16, cert: &str, key: &str) -> bool {
    // Succeeds only if the server lets the handshake and a round trip through.
    // -quiet keeps s_client open after stdin ends (it implies -ign_eof): a
    // 3 s timeout ends it once the echo had time to come back.
    let mut c = Command::new("timeout")
        .args([
            "3",
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            &format!("[::1]:{port}"),
            "-CAfile",
            "ca.pem",
        ])
        .args(["-cert", cert, "-key", key])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _ = writeln!(c.stdin.take().unwrap(), "ping");
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("ping")
}

/// A fresh test directory `$TMPDIR/{name}-PID` holding the test PKI ([`pki`]).
fn dir_with_pki(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    pki(&dir);
    dir
}

#[test]
fn bridge_and_stunnel_interoperate_both_ways_and_refuse_what_they_should() {
    let dir = dir_with_pki("sixmesh-bridge");
    let echo = echo_server();
    let (st_server, our_client, our_server, st_client) = (free_port(), free_port(), free_port(), free_port());
    let (prefix_only, metrics_port) = (free_port(), free_port());

    let _sts = stunnel(
        &dir,
        "server",
        &format!(
            "[in]\naccept = ::1:{st_server}\nconnect = 127.0.0.1:{echo}\ncert = theirs.pem\nkey = theirs.key\n\
             CAfile = ca.pem\nverifyChain = yes\nrequireCert = yes\n"
        ),
    );
    let _stc = stunnel(
        &dir,
        "client",
        &format!(
            "[out]\nclient = yes\naccept = 127.0.0.1:{st_client}\nconnect = ::1:{our_server}\ncert = theirs.pem\n\
             key = theirs.key\nCAfile = ca.pem\nverifyChain = yes\ncheckIP = ::1\n"
        ),
    );
    let d = dir.display();
    std::fs::write(
        dir.join("bridge.toml"),
        format!(
            "[tls]\ncert = \"{d}/ours.pem\"\nkey = \"{d}/ours.key\"\nca = \"{d}/ca.pem\"\ncrl = \"{d}/crl.pem\"\n\n\
             [[tunnel]]\nname = \"to-stunnel\"\nmode = \"client\"\nlisten = \"127.0.0.1:{our_client}\"\n\
             connect = \"[::1]:{st_server}\"\nallow = [\"cn:theirs\"]\n\n\
             [[tunnel]]\nname = \"from-stunnel\"\nmode = \"server\"\nlisten = \"[::1]:{our_server}\"\n\
             connect = \"127.0.0.1:{echo}\"\nallow = [\"cn:theirs\", \"cn:revoked\", \"cn:expired\"]\n\n\
             [[tunnel]]\nname = \"mesh-only\"\nmode = \"server\"\nlisten = \"[::1]:{prefix_only}\"\n\
             connect = \"127.0.0.1:{echo}\"\nallow = [\"prefix:fd00::/8\"]\n"
        ),
    )
    .unwrap();
    let log = dir.join("bridge.log");
    let _bridge = Killed(
        Command::new(sixmesh_bin())
            .args(["bridge", "run", "--config", dir.join("bridge.toml").to_str().unwrap()])
            .args([
                "--control",
                dir.join("bridge.sock").to_str().unwrap(),
                "--metrics",
                &format!("127.0.0.1:{metrics_port}"),
            ])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    // Our client -> stunnel server -> echo.
    assert_eq!(
        ask(our_client, "hello through sixmesh then stunnel").unwrap(),
        "hello through sixmesh then stunnel"
    );
    // stunnel client -> our server -> echo.
    assert_eq!(
        ask(st_client, "hello through stunnel then sixmesh").unwrap(),
        "hello through stunnel then sixmesh"
    );
    // Second connections each way resume the first one's TLS session
    // (counted below).
    assert_eq!(ask(our_client, "resumed to stunnel").unwrap(), "resumed to stunnel");
    assert_eq!(ask(st_client, "resumed from stunnel").unwrap(), "resumed from stunnel");

    // Refusals, each logged with its reason.
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut plain = TcpStream::connect(("::1", our_server)).unwrap();
    writeln!(plain, "plain text").unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut junk = String::new();
    let _ = BufReader::new(plain).read_line(&mut junk);
    assert!(!junk.contains("plain text"), "a plain-TCP client got through");
    assert!(
        !openssl_client(&dir, our_server, "stranger.pem", "stranger.key"),
        "a certificate of another CA got through"
    );
    assert!(
        !openssl_client(&dir, our_server, "revoked.pem", "revoked.key"),
        "a revoked certificate got through"
    );
    assert!(
        !openssl_client(&dir, our_server, "expired.pem", "expired.key"),
        "an expired certificate got through"
    );
    assert!(openssl_client(&dir, our_server, "theirs.pem", "theirs.key"), "a good certificate was refused");
    assert!(
        !openssl_client(&dir, our_server, "ours.pem", "ours.key"),
        "a certificate the tunnel does not allow got through"
    );
    assert!(
        !openssl_client(&dir, prefix_only, "theirs.pem", "theirs.key"),
        "a certificate outside the allowed prefix got through"
    );
    std::thread::sleep(Duration::from_millis(300));
    let text = log_text();
    let refusals = text.lines().filter(|l| l.contains("refused:")).count();
    assert!(refusals >= 6, "expected 6 logged refusals:\n{text}");
    // Counters: on the control socket and in the Prometheus metrics.
    let status = Command::new(sixmesh_bin())
        .args(["bridge", "status", "--json", "--control", dir.join("bridge.sock").to_str().unwrap()])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("bridge status JSON");
    let from =
        status["tunnels"].as_array().unwrap().iter().find(|t| t["name"] == "from-stunnel").unwrap().clone();
    assert!(from["accepted"].as_u64().unwrap() >= 2 && from["refused"].as_u64().unwrap() >= 5, "{status}");
    assert!(from["bytes_in"].as_u64().unwrap() > 0, "{status}");
    assert!(from["resumed"].as_u64().unwrap() >= 1, "stunnel's client did not resume with us: {status}");
    let to =
        status["tunnels"].as_array().unwrap().iter().find(|t| t["name"] == "to-stunnel").unwrap().clone();
    assert!(to["resumed"].as_u64().unwrap() >= 1, "we did not resume with stunnel's server: {status}");
    let mut m = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    m.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut metrics = String::new();
    std::io::Read::read_to_string(&mut m, &mut metrics).unwrap();
    assert!(metrics.contains("sixmesh_bridge_refused_total{tunnel=\"mesh-only\"} 1"), "{metrics}");
    assert!(text.contains("Expired") || text.contains("expired"), "{text}");
    assert!(text.contains("not allowed on this tunnel"), "{text}");
    assert!(text.contains("Revoked") || text.contains("revoked"), "{text}");

    // Hot reload: rotate our certificate while a connection is open. The
    // open connection survives; new connections see the new certificate.
    let mut open = TcpStream::connect(("127.0.0.1", st_client)).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(open.try_clone().unwrap());
    let mut roundtrip = |msg: &str| {
        writeln!(open, "{msg}").unwrap();
        let mut l = String::new();
        reader.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    };
    assert_eq!(roundtrip("before rotation"), "before rotation");
    let serial = |d: &Path| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "timeout 3 openssl s_client -connect '[::1]:{our_server}' -CAfile ca.pem -cert theirs.pem -key theirs.key \
                 </dev/null 2>/dev/null | openssl x509 -noout -serial"
            ))
            .current_dir(d)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let before = serial(&dir);
    sh(
        &dir,
        "openssl ecparam -name prime256v1 -genkey -noout -out new.key
         openssl req -new -key new.key -subj /CN=ours -out new.csr
         openssl x509 -req -in new.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 -extfile ext -out new.pem
         cp new.key ours.key.tmp && mv ours.key.tmp ours.key && cp new.pem ours.pem.tmp && mv ours.pem.tmp ours.pem",
    );
    let start = Instant::now();
    let mut after = serial(&dir);
    while after == before && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(300));
        after = serial(&dir);
    }
    assert!(
        !before.is_empty() && after != before,
        "new connections still see the old certificate ({before})"
    );
    assert_eq!(roundtrip("after rotation"), "after rotation", "the open connection did not survive");
    assert!(log_text().contains("reloaded"), "{}", log_text());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Starts `sixmesh bridge run` on `conf`, logging at info into the test
/// directory; returns it with its log file and control socket.
fn start_bridge(dir: &Path, conf: &Path) -> (Killed, PathBuf, PathBuf) {
    let (log, sock) = (dir.join("bridge.log"), dir.join("bridge.sock"));
    let bridge = Killed(
        Command::new(sixmesh_bin())
            .args(["bridge", "run", "--config", conf.to_str().unwrap(), "--control", sock.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    (bridge, log, sock)
}

/// `sixmesh bridge status --json` of a running bridge.
fn bridge_status(sock: &Path) -> serde_json::Value {
    let out = Command::new(sixmesh_bin())
        .args(["bridge", "status", "--json", "--control", sock.to_str().unwrap()])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bridge status: {e}"))
}

/// One round trip on an open connection.
fn roundtrip(s: &mut TcpStream, r: &mut BufReader<TcpStream>, msg: &str) -> String {
    writeln!(s, "{msg}").unwrap();
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l.trim_end().to_string()
}

/// Waits up to 10 s for `cond`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The config file reloads (SIGHUP, or the file changing) without dropping
/// open connections: a changed `allow` applies to new connections only, a
/// new tunnel starts listening, a removed one stops accepting while its
/// open connection goes on, and a broken file changes nothing.
#[test]
fn bridge_config_reloads_without_dropping_connections() {
    let dir = dir_with_pki("sixmesh-bridge-reload");
    let echo = echo_server();
    let (first, second, server) = (free_port(), free_port(), free_port());
    let d = dir.display();
    let tls = format!("[tls]\ncert = \"{d}/ours.pem\"\nkey = \"{d}/ours.key\"\nca = \"{d}/ca.pem\"\n\n");
    let server_tunnel = format!(
        "[[tunnel]]\nname = \"server\"\nmode = \"server\"\nlisten = \"[::1]:{server}\"\nconnect = \"127.0.0.1:{echo}\"\n\n"
    );
    let client = |name: &str, port: u16, allow: &str| {
        format!(
            "[[tunnel]]\nname = \"{name}\"\nmode = \"client\"\nlisten = \"127.0.0.1:{port}\"\n\
             connect = \"[::1]:{server}\"\nallow = [\"{allow}\"]\n\n"
        )
    };
    let conf = dir.join("bridge.toml");
    // Written through a rename, as editors and config managers do.
    let write = |text: String| {
        std::fs::write(dir.join("bridge.toml.tmp"), text).unwrap();
        std::fs::rename(dir.join("bridge.toml.tmp"), &conf).unwrap();
    };
    write(format!("{tls}{server_tunnel}{}", client("first", first, "cn:ours")));
    let (bridge, log, sock) = start_bridge(&dir, &conf);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(ask(first, "hello").unwrap(), "hello");
    let mut open = TcpStream::connect(("127.0.0.1", first)).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(open.try_clone().unwrap());
    assert_eq!(roundtrip(&mut open, &mut reader, "open"), "open");

    // SIGHUP: "first" no longer allows our server's certificate, "second" is new.
    write(format!(
        "{tls}{server_tunnel}{}{}",
        client("first", first, "cn:nobody"),
        client("second", second, "any")
    ));
    let hup = Command::new("kill").args(["-HUP", &bridge.0.id().to_string()]).status().unwrap();
    assert!(hup.success());
    wait_for("the SIGHUP reload", || log_text().contains("bridge configuration and certificates reloaded"));
    assert_eq!(ask(second, "new tunnel").unwrap(), "new tunnel");
    assert!(ask(first, "refused now").is_err(), "the new allow rule did not apply");
    assert!(log_text().contains("is not allowed on this tunnel"), "{}", log_text());
    assert_eq!(
        roundtrip(&mut open, &mut reader, "still open"),
        "still open",
        "the open connection was dropped"
    );

    // The file changes (no signal): "first" is removed.
    write(format!("{tls}{server_tunnel}{}", client("second", second, "any")));
    wait_for("the removed tunnel to stop listening", || TcpStream::connect(("127.0.0.1", first)).is_err());
    assert!(log_text().contains("tunnel removed"), "{}", log_text());
    assert_eq!(
        roundtrip(&mut open, &mut reader, "removed but open"),
        "removed but open",
        "the open connection of a removed tunnel was dropped"
    );
    assert_eq!(ask(second, "second still").unwrap(), "second still");

    // A broken file is reported and changes nothing.
    write(format!("{tls}{server_tunnel}[[tunnel]]\nname = \"broken\"\n"));
    wait_for("the broken file to be reported", || log_text().contains("keeping the running config"));
    assert_eq!(ask(second, "after broken").unwrap(), "after broken");
    let status = bridge_status(&sock).to_string();
    assert!(status.contains("\"second\"") && !status.contains("\"first\""), "{status}");
    drop(bridge);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A server that reads until EOF, then answers how many bytes it got and
/// closes: it only answers if the half-close crossed the bridge.
fn count_until_eof_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if std::io::Read::read_to_end(&mut s, &mut buf).is_ok() {
                    let _ = writeln!(s, "{}", buf.len());
                }
            });
        }
    });
    port
}

/// Half-closes cross both ends of a pair of our tunnels, idle connections
/// are closed after `idle_timeout_secs`, and `max_connections` refuses the
/// one too many (counted and logged).
#[test]
fn bridge_propagates_half_close_closes_idle_and_limits_connections() {
    let dir = dir_with_pki("sixmesh-bridge-limits");
    let (counter, echo) = (count_until_eof_server(), echo_server());
    let (half, half_in, idle, idle_in) = (free_port(), free_port(), free_port(), free_port());
    let d = dir.display();
    let tunnel = |name: &str, mode: &str, listen: String, connect: String| {
        format!(
            "[[tunnel]]\nname = \"{name}\"\nmode = \"{mode}\"\nlisten = \"{listen}\"\nconnect = \"{connect}\"\n\n"
        )
    };
    let conf = dir.join("bridge.toml");
    std::fs::write(
        &conf,
        format!(
            "idle_timeout_secs = 2\nmax_connections = 2\n\
             [tls]\ncert = \"{d}/ours.pem\"\nkey = \"{d}/ours.key\"\nca = \"{d}/ca.pem\"\n\n{}{}{}{}",
            tunnel("half", "client", format!("127.0.0.1:{half}"), format!("[::1]:{half_in}")),
            tunnel("half-in", "server", format!("[::1]:{half_in}"), format!("127.0.0.1:{counter}")),
            tunnel("idle", "client", format!("127.0.0.1:{idle}"), format!("[::1]:{idle_in}")),
            tunnel("idle-in", "server", format!("[::1]:{idle_in}"), format!("127.0.0.1:{echo}")),
        ),
    )
    .unwrap();
    let (_bridge, log, sock) = start_bridge(&dir, &conf);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(ask(idle, "up").unwrap(), "up");

    // Half-close: 100 kB, then EOF our way; the answer comes back the other way.
    let mut s = TcpStream::connect(("127.0.0.1", half)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&vec![7u8; 100_000]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).expect("the answer after our half-close");
    assert_eq!(answer.trim(), "100000", "the server did not see our EOF, or not every byte");

    // Idle: a connection with no traffic for two seconds is closed by the bridge.
    let mut quiet = TcpStream::connect(("127.0.0.1", idle)).unwrap();
    quiet.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(quiet, "hello").unwrap();
    let mut r = BufReader::new(quiet.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "hello");
    let start = Instant::now();
    line.clear();
    let n = r.read_line(&mut line).unwrap_or(0);
    assert_eq!(n, 0, "an idle connection stayed open");
    assert!(start.elapsed() < Duration::from_secs(6), "closed only after {:?}", start.elapsed());

    // Limit: two open connections on "idle" (younger than its timeout), the third is refused.
    let keep: Vec<TcpStream> = (0..2)
        .map(|i| {
            let mut c = TcpStream::connect(("127.0.0.1", idle)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            writeln!(c, "keep {i}").unwrap();
            let mut l = String::new();
            BufReader::new(c.try_clone().unwrap()).read_line(&mut l).unwrap();
            assert_eq!(l.trim(), format!("keep {i}"));
            c
        })
        .collect();
    let mut third = TcpStream::connect(("127.0.0.1", idle)).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = writeln!(third, "third");
    let mut l = String::new();
    let n = BufReader::new(third).read_line(&mut l).unwrap_or(0);
    assert_eq!(n, 0, "the third connection got through: {l:?}");
    wait_for("the refusal in the log", || log_text().contains("refused: too many connections"));
    drop(keep);
    let status = bridge_status(&sock);
    let idle_t = status["tunnels"].as_array().unwrap().iter().find(|t| t["name"] == "idle").unwrap().clone();
    assert!(idle_t["refused"].as_u64().unwrap() >= 1, "{status}");
    std::fs::remove_dir_all(&dir).unwrap();
}
