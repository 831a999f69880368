//! A local `redis-server` process: used by the one-machine mode (`mp up`) and by tests,
//! which start their own on a free port. Durable by default: AOF with `appendfsync always`,
//! so an acknowledged write survives `kill -9` of the server.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// CPU time (user + system) used so far by process `pid` (a number or `self`), from
/// `/proc` (Linux only; `None` elsewhere).
pub fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // In USER_HZ units, which Linux fixes at 100 per second in its user ABI.
    Some(Duration::from_millis(ticks * 10))
}

/// The ACL user the platform connects as (the `default` user has a password of its own).
pub const REDIS_USER: &str = "mp";

/// What the platform's user may run: everything but Redis's `@dangerous` commands (FLUSHALL,
/// KEYS, DEBUG, SHUTDOWN, MONITOR, REPLICAOF, ACL, MODULE…), except the few it uses — INFO
/// (memory figures), LATENCY and CONFIG GET/SET (the latency monitor of the benchmarks).
pub const REDIS_ACL: &[&str] = &[
    "~*",
    "&*",
    "+@all",
    "-@dangerous",
    "+info",
    "+latency",
    "+config|get",
    "+config|set",
];

/// The platform user's password of the server whose data is in `dir`: made on first use (32
/// random bytes as hex) and kept in `dir/redis.password`, readable by its owner only, so a
/// restart on the same directory keeps it.
pub fn password_for(dir: &Path) -> std::io::Result<String> {
    secret(dir, "redis.password")
}

fn secret(dir: &Path, name: &str) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = dir.join(name);
    if let Ok(p) = std::fs::read_to_string(&file) {
        if !p.trim().is_empty() {
            return Ok(p.trim().to_string());
        }
    }
    std::fs::create_dir_all(dir)?;
    let password = format!("{}{}", crate::new_id(), crate::new_id());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&file)?;
    f.write_all(password.as_bytes())?;
    f.sync_all()?;
    Ok(password)
}

/// The URL of the server that [`RedisServer::start`] would run on `port` with `dir`.
pub fn url_for(dir: &Path, port: u16) -> std::io::Result<String> {
    Ok(format!(
        "redis://{REDIS_USER}:{}@127.0.0.1:{port}",
        password_for(dir)?
    ))
}

impl RedisServer {
    /// Starts redis-server on 127.0.0.1:`port` with its data in `dir`, and waits until it answers.
    /// It asks for a password (user [`REDIS_USER`], [`password_for`] `dir`), and that user
    /// may not run Redis's dangerous commands ([`REDIS_ACL`]).
    pub fn start(dir: &Path, port: u16) -> std::io::Result<RedisServer> {
        std::fs::create_dir_all(dir)?;
        let mut s = RedisServer {
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    /// Starts one on a free port.
    pub fn start_free(dir: &Path) -> std::io::Result<RedisServer> {
        Self::start(dir, free_port()?)
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let password = password_for(&self.dir)?;
        let pass = format!(">{password}");
        let mut user = vec!["--user", REDIS_USER, "on", &pass];
        user.extend_from_slice(REDIS_ACL);
        // The default user keeps every permission behind a password of its own, which the
        // platform never uses: Redis 7.0 replays the AOF as the default user, and one that
        // is off or limited makes every MULTI/EXEC of the AOF fail on restart (NOPERM) —
        // acknowledged writes lost.
        let admin = format!(">{}", secret(&self.dir, "redis.admin-password")?);
        let child = Command::new("redis-server")
            .args(["--user", "default", "on", &admin, "~*", "&*", "+@all"])
            .args(&user)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--dir",
                &self.dir.to_string_lossy(),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--protected-mode",
                "yes",
                "--logfile",
                &self.dir.join("redis.log").to_string_lossy(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("starting redis-server (apt-get install redis-server): {e}"),
                )
            })?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let hello = format!("AUTH {REDIS_USER} {password}\r\nPING\r\n");
                if s.write_all(hello.as_bytes()).is_ok() {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if got.ends_with(b"\r\n") && got.windows(5).any(|w| w == b"+PONG") {
                            return Ok(());
                        }
                        if got.len() > 4096 || got.starts_with(b"-") {
                            break;
                        }
                    }
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(std::io::Error::other(format!(
                        "redis-server exited with {status}; see {}",
                        self.dir.join("redis.log").display()
                    )));
                }
            }
            if start.elapsed() > Duration::from_secs(15) {
                return Err(std::io::Error::other(
                    "redis-server did not answer within 15 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://mp:PASSWORD@127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        url_for(&self.dir, self.port).unwrap_or_else(|_| format!("redis://127.0.0.1:{}", self.port))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// CPU time the server process has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time(&self.pid()?.to_string())
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and data directory (replaying the AOF).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Asks the server to shut down cleanly (SIGTERM: it finishes its AOF), then reaps it.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.as_ref() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work_and_is_none_for_no_process() {
        let a = cpu_time("self").expect("this process's CPU time");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let b = cpu_time("self").unwrap();
        assert!(b >= a + Duration::from_millis(100), "{a:?} -> {b:?}");
        assert!(cpu_time("0").is_none());
        assert!(cpu_time("not-a-pid").is_none());
    }
}
