//! Raw-mode tty access with tokio (board side /dev/ttyGSn and host side /dev/ttyACMn).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Open a tty non-blocking, without becoming its controlling terminal, in raw mode, and drop
/// whatever is buffered. `baud` sets the line speed (never pass 1200 to a Klipper board).
pub fn open_raw(path: &Path, baud: Option<libc::speed_t>) -> io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: plain libc calls on a valid C string and a fd we own.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd.as_raw_fd(), &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        t.c_cflag |= libc::CLOCAL | libc::CREAD;
        if let Some(b) = baud {
            libc::cfsetispeed(&mut t, b);
            libc::cfsetospeed(&mut t, b);
        }
        if libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::tcflush(fd.as_raw_fd(), libc::TCIOFLUSH);
        Ok(fd)
    }
}

/// An async raw tty.
#[derive(Clone)]
pub struct Tty {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl Tty {
    pub fn new(fd: OwnedFd) -> io::Result<Tty> {
        // SAFETY: the OwnedFd is moved into the AsyncFd and stays open for its lifetime.
        let afd = unsafe { AsyncFd::register(fd) }?;
        Ok(Tty { fd: Arc::new(afd) })
    }

    /// Read some bytes; Ok(0) means end of file (hang-up).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| {
                // SAFETY: reading into a valid buffer from a valid fd.
                let n = unsafe { libc::read(inner.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Write everything.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| {
                // SAFETY: writing from a valid buffer to a valid fd.
                let n = unsafe { libc::write(inner.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(0)) => return Err(io::Error::new(io::ErrorKind::WriteZero, "tty accepted no bytes")),
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Something to write, optionally after a delay (models flash write latency).
#[derive(Debug)]
pub struct Outgoing {
    pub delay: Duration,
    pub bytes: Vec<u8>,
}

/// What a session reports to its owner.
#[derive(Debug)]
pub enum SessionEvent {
    Data(Vec<u8>),
    Closed(String),
}

/// A reader task and a writer task on one open tty. Dropping the session stops both and
/// closes the fd.
pub struct TtySession {
    pub tx: mpsc::UnboundedSender<Outgoing>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for TtySession {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl TtySession {
    /// Start the tasks; `report` gets every received chunk and, last, the close reason.
    pub fn start<F>(tty: Tty, report: F) -> TtySession
    where
        F: Fn(SessionEvent) + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let rtty = tty.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match rtty.read(&mut buf).await {
                    Ok(0) => {
                        report(SessionEvent::Closed("end of file (hang-up)".into()));
                        return;
                    }
                    Ok(n) => report(SessionEvent::Data(buf[..n].to_vec())),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        report(SessionEvent::Closed(e.to_string()));
                        return;
                    }
                }
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                if !out.delay.is_zero() {
                    tokio::time::sleep(out.delay).await;
                }
                // A host that stops reading must not wedge the board: give up on this chunk.
                match tokio::time::timeout(Duration::from_secs(5), tty.write_all(&out.bytes)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        eprintln!("tty write failed: {e}");
                        return;
                    }
                    Err(_) => eprintln!("tty write timed out; dropped {} bytes", out.bytes.len()),
                }
            }
        });
        TtySession { tx, reader, writer }
    }

    /// Stop both tasks and wait until they are gone, so the fd is closed on return (the
    /// kernel refuses to remove an ACM function while its tty is open).
    pub async fn close(mut self) {
        self.reader.abort();
        self.writer.abort();
        let _ = (&mut self.reader).await;
        let _ = (&mut self.writer).await;
    }

    pub fn send(&self, bytes: Vec<u8>, delay: Duration) {
        let _ = self.tx.send(Outgoing { delay, bytes });
    }
}
