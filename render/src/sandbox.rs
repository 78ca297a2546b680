//! One render in a child process with memory and time bounds, for a caller that must not die with
//! it: a Postgres backend (`render_template`, `send_test`). minijinja cannot stop one huge
//! allocation (a template that doubles a string 28 times asks for 2 GiB in one `~`, and Rust aborts
//! the process when an allocation fails), so the render runs in a `fork()`ed copy of the caller under
//! `RLIMIT_AS` (its current size plus [`MEMORY`]), answers over a pipe and `_exit`s; the caller
//! waits at most [`TIMEOUT`]. The daemon's render workers have the same bounds (`herald run`).
//!
//! The child runs only this crate's code (no Postgres call, no exit handler), so forking a
//! single-threaded backend is safe; a child that dies or overruns is killed and reaped.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::engine::{Engine, Undefined};
use crate::vars::Vars;

/// Address space a render may add to its process.
pub const MEMORY: u64 = 512 * 1024 * 1024;
/// Wall-clock time one render may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The message of a render whose process died (out of memory).
pub fn memory_message(names: &str) -> String {
    format!(
        "template error in {names}: rendering needed more than {} MiB of memory (the render process stopped)",
        MEMORY / (1024 * 1024)
    )
}

/// The message of a render that overran [`TIMEOUT`].
pub fn timeout_message(names: &str) -> String {
    format!(
        "template error in {names}: rendering took more than {} s",
        TIMEOUT.as_secs()
    )
}

/// Kills and reaps the child on every way out (an error raised by the caller's interrupt check
/// unwinds through here).
struct Child(libc::pid_t);

impl Child {
    /// Waits for the child; true when it ended normally.
    fn reap(&mut self) -> bool {
        let mut status = 0;
        // SAFETY: waitpid on our own child, with a valid out-pointer.
        let r = unsafe { libc::waitpid(self.0, &mut status, 0) };
        self.0 = 0;
        r > 0 && libc::WIFEXITED(status)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.0 > 0 {
            // SAFETY: signalling and reaping our own child.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// The current address-space size of this process, in bytes (`/proc/self/statm`).
fn address_space() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page
}

/// Renders `fields` (see [`Engine::render_fields`]) in a forked child. `poll` is called about every
/// 100 ms while waiting (a backend checks for a cancel there; it may unwind).
pub fn render_fields(
    fields: &[(String, Json)],
    vars: &Vars,
    undefined: Undefined,
    mut poll: impl FnMut(),
) -> Result<Vec<Json>, String> {
    let names = fields
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let engine = Engine::new();
    let limit = address_space() + MEMORY;
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "cannot start the render process: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: both descriptors were just opened and are owned here alone.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller is single-threaded (a Postgres backend); the child only renders, writes to
    // the pipe and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!(
            "cannot start the render process: {}",
            std::io::Error::last_os_error()
        ));
    }
    if pid == 0 {
        drop(read);
        child_main(&engine, fields, vars, undefined, limit, write);
    }
    let mut child = Child(pid);
    drop(write);
    let mut file = std::fs::File::from(read);
    // SAFETY: the descriptor is open; O_NONBLOCK only changes how reads wait.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        libc::fcntl(
            fd,
            libc::F_SETFL,
            libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
        );
    }
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > TIMEOUT {
                    return Err(timeout_message(&names));
                }
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&file),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 100) };
                poll();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => poll(),
            Err(e) => return Err(format!("the render process failed: {e}")),
        }
    }
    let clean = child.reap();
    match serde_json::from_slice::<Result<Vec<Json>, String>>(&answer) {
        Ok(answer) if clean => answer,
        _ => Err(memory_message(&names)),
    }
}

/// The child: bounds itself, renders, answers, and leaves without running any exit handler.
fn child_main(
    engine: &Engine,
    fields: &[(String, Json)],
    vars: &Vars,
    undefined: Undefined,
    limit: u64,
    write: OwnedFd,
) -> ! {
    // SAFETY: setting this process's own limit, signal dispositions and stderr; _exit never returns.
    unsafe {
        // what the child would say itself (Rust's "memory allocation of … bytes failed" before it
        // aborts, a panic's message) would land in the caller's stderr, a backend's being the server
        // log, where it reads as if the server had run out of memory; the caller learns the outcome
        // from the pipe and says it in its own error
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 2);
            libc::close(null);
        }
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGHUP,
        ] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
            libc::_exit(2);
        }
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        engine.render_fields(fields, vars, undefined)
    }))
    .unwrap_or_else(|_| Err("template error: the renderer failed".to_string()));
    let mut file = std::fs::File::from(write);
    let ok = serde_json::to_writer(&mut file, &result).is_ok();
    drop(file);
    // SAFETY: leaving the child at once, as a forked copy of another program must.
    unsafe { libc::_exit(if ok { 0 } else { 3 }) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars() -> Vars {
        Vars::from_payload(
            "acme",
            &json!({"contact": {"email": "ann@example.com", "first_name": "Ann"}}),
        )
    }

    #[test]
    fn renders_like_the_engine() {
        let fields = vec![("subject".to_string(), json!("Hi {{ contact.first_name }}"))];
        let got = render_fields(&fields, &vars(), Undefined::Fail, || {}).unwrap();
        assert_eq!(got, vec![json!("Hi Ann")]);
        let fields = vec![("subject".to_string(), json!("Hi {{ contact.nickname }}"))];
        let e = render_fields(&fields, &vars(), Undefined::Fail, || {}).unwrap_err();
        assert!(e.contains("contact.nickname is not defined"), "{e}");
    }

    #[test]
    fn a_template_that_doubles_a_string_28_times_fails_in_the_child_only() {
        let mut t = String::from("{% set s = \"12345678\" %}");
        for _ in 0..28 {
            t.push_str("{% set s = s ~ s %}");
        }
        t.push_str("{{ s|length }}");
        let fields = vec![("html".to_string(), json!(t))];
        let e = render_fields(&fields, &vars(), Undefined::Fail, || {}).unwrap_err();
        assert!(e.contains("more than 512 MiB of memory"), "{e}");
        // and this process goes on rendering
        let fields = vec![("subject".to_string(), json!("{{ workspace }}"))];
        assert_eq!(
            render_fields(&fields, &vars(), Undefined::Fail, || {}).unwrap(),
            vec![json!("acme")]
        );
    }
}
