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

impl RedisServer {
    /// Starts redis-server on 127.0.0.1:`port` with its data in `dir`, and waits until it answers.
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
        let child = Command::new("redis-server")
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
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut buf = [0u8; 64];
                    if let Ok(n) = s.read(&mut buf) {
                        if buf[..n].starts_with(b"+PONG") {
                            return Ok(());
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

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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

    /// Asks the server to shut down cleanly (SHUTDOWN), then reaps it.
    pub fn stop(&mut self) {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
            use std::io::Write;
            let _ = s.write_all(b"SHUTDOWN\r\n");
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
