//! Real proxies in front of an app, asking a Castellan decision point: nginx (`auth_request`)
//! and Caddy (`forward_auth`), each run from a configuration written from the templates in
//! `examples/` (the same files operators copy). Used by the demo and the tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nginx example: `auth_request` to the decision point's forward-auth endpoint.
pub const NGINX_TEMPLATE: &str = include_str!("../../../examples/forward-auth/nginx.conf");
/// The Caddy example: `forward_auth` with `copy_headers`.
pub const CADDY_TEMPLATE: &str = include_str!("../../../examples/forward-auth/Caddyfile");

/// A peer proxy process; killed on drop.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    /// Where it listens (plain HTTP).
    pub addr: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `cmd` is on the PATH.
pub fn installed(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
        || Command::new(cmd)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Fills a template's `{{NAME}}` placeholders.
fn fill(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_owned();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    out
}

fn wait_listening(addr: SocketAddr, child: &mut Child, log: &Path) -> Result<(), String> {
    let t0 = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("exited with {status}: {text}"));
        }
        if t0.elapsed() > Duration::from_secs(15) {
            return Err(format!("not listening on {addr} after 15 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts nginx on a free loopback port in front of `app`, asking `forward_auth` (the decision
/// point's plain HTTP listener) about every request. Files go under `dir`.
pub fn start_nginx(dir: &Path, forward_auth: SocketAddr, app: SocketAddr) -> Result<Peer, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let conf = fill(
        NGINX_TEMPLATE,
        &[
            ("LISTEN", format!("127.0.0.1:{port}")),
            ("DECISION_POINT", forward_auth.to_string()),
            ("APP", app.to_string()),
        ],
    );
    // The example is an `http {}` fragment; standalone it needs a main context.
    let d = dir.display();
    let main = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{conf}\n}}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, main).map_err(|e| e.to_string())?;
    let log = dir.join("error.log");
    let mut child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("nginx: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, &mut child, &log).map_err(|e| format!("nginx: {e}"))?;
    Ok(Peer { child, addr, log })
}

/// Starts Caddy on a free loopback port in front of `app`, with `forward_auth` to the decision
/// point's plain HTTP listener. Files (and Caddy's data dirs) go under `dir`.
pub fn start_caddy(dir: &Path, forward_auth: SocketAddr, app: SocketAddr) -> Result<Peer, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let conf = fill(
        CADDY_TEMPLATE,
        &[
            ("LISTEN", format!("http://127.0.0.1:{port}")),
            ("DECISION_POINT", forward_auth.to_string()),
            ("APP", app.to_string()),
        ],
    );
    let main = format!("{{\n\tadmin off\n\tauto_https off\n}}\n\n{conf}");
    let conf_path = dir.join("Caddyfile");
    std::fs::write(&conf_path, main).map_err(|e| e.to_string())?;
    let log = dir.join("caddy.log");
    let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut child = Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&conf_path)
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .map_err(|e| format!("caddy: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, &mut child, &log).map_err(|e| format!("caddy: {e}"))?;
    Ok(Peer { child, addr, log })
}
