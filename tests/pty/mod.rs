//! A command on a real pseudo-terminal, as a user at a terminal runs it: its own session
//! with the pty as controlling terminal, so a Ctrl-C typed into the pty reaches it as SIGINT
//! through the kernel's line discipline (not a `kill` from the test).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub struct PtyChild {
    child: Arc<Mutex<Child>>,
    master: std::fs::File,
    output: Arc<(Mutex<String>, Condvar)>,
    exited: mpsc::Receiver<ExitStatus>,
    /// Closed when the reader has seen the end of the output (every slave fd closed).
    drained: mpsc::Receiver<()>,
}

impl PtyChild {
    /// Start `cmd` with stdin, stdout and stderr on a new pty.
    pub fn spawn(mut cmd: Command) -> PtyChild {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let slave: OwnedFd = pty.slave;
        let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup pty"));
        cmd.stdin(stdio(&slave)).stdout(stdio(&slave)).stderr(stdio(&slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn on pty");
        drop(slave);
        let master = std::fs::File::from(pty.master);
        let output = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let (drained_tx, drained) = mpsc::channel::<()>();
        {
            let mut reader = master.try_clone().expect("dup master");
            let output = output.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // EIO once the last slave fd closes: the child is gone.
                while let Ok(n) = reader.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output.0.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                    output.1.notify_all();
                }
                drop(drained_tx);
            });
        }
        let child = Arc::new(Mutex::new(child));
        let (tx, exited) = mpsc::channel();
        {
            let child = child.clone();
            let pid = child.lock().unwrap().id() as i32;
            std::thread::spawn(move || {
                // waitpid without holding the lock, so kill() stays possible.
                let mut status = 0;
                // SAFETY: plain waitpid on our own child.
                let r = unsafe { libc::waitpid(pid, &mut status, 0) };
                if r == pid {
                    let _ = tx.send(ExitStatus::from_raw(status));
                }
                drop(child);
            });
        }
        PtyChild { child, master, output, exited, drained }
    }

    pub fn output(&self) -> String {
        self.output.0.lock().unwrap().clone()
    }

    /// Wait until the output contains `text`; panics with the output so far at `timeout`.
    pub fn expect(&self, text: &str, timeout: Duration) {
        let (lock, cond) = &*self.output;
        let out = lock.lock().unwrap();
        let (out, waited) = cond.wait_timeout_while(out, timeout, |o| !o.contains(text)).unwrap();
        assert!(!waited.timed_out(), "no {text:?} within {timeout:?}; output so far:\n{}", *out);
    }

    /// Type bytes into the terminal.
    pub fn type_bytes(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("write to pty");
    }

    /// Type Ctrl-C and return how long the command took to exit, with its status.
    pub fn ctrl_c(&mut self, timeout: Duration) -> (Duration, ExitStatus) {
        let t = Instant::now();
        self.type_bytes(b"\x03");
        match self.exited.recv_timeout(timeout) {
            Ok(status) => {
                let took = t.elapsed();
                self.drain();
                (took, status)
            }
            Err(_) => {
                let out = self.output();
                self.kill();
                panic!("still running {timeout:?} after Ctrl-C; output:\n{out}")
            }
        }
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match self.exited.recv_timeout(timeout) {
            Ok(status) => {
                self.drain();
                status
            }
            Err(_) => {
                let out = self.output();
                self.kill();
                panic!("still running after {timeout:?}; output:\n{out}")
            }
        }
    }

    /// Wait (a little) until the reader has everything the command wrote before it exited.
    fn drain(&self) {
        let _ = self.drained.recv_timeout(Duration::from_secs(5));
    }

    pub fn kill(&self) {
        let pid = self.child.lock().unwrap().id() as i32;
        // SAFETY: signalling our own child's process group (it is a session leader).
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }

    pub fn master_fd(&self) -> i32 {
        self.master.as_raw_fd()
    }
}

impl Drop for PtyChild {
    fn drop(&mut self) {
        self.kill();
    }
}
