//! The board's USB CDC-ACM tty: raw, non-blocking, read through tokio's reactor (readiness
//! events, no polling), and the 1200-baud bootloader request.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::termios::{self, BaudRate, SetArg};
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// A raw tty opened for protocol traffic.
pub struct Tty {
    fd: AsyncFd<OwnedFd>,
}

impl Tty {
    /// Open `path` raw (no echo, no line discipline), 8N1, non-blocking.
    pub fn open(path: &Path) -> std::io::Result<Tty> {
        let fd = open_nonblocking(path)?;
        let mut t = termios::tcgetattr(&fd)?;
        termios::cfmakeraw(&mut t);
        // USB CDC ignores the rate, but 1200 would be a reboot request: pick a sane one.
        termios::cfsetspeed(&mut t, BaudRate::B115200)?;
        termios::tcsetattr(&fd, SetArg::TCSANOW, &t)?;
        termios::tcflush(&fd, termios::FlushArg::TCIOFLUSH)?;
        // SAFETY: the AsyncFd owns the descriptor; it is deregistered before it is closed on drop.
        Ok(Tty { fd: unsafe { AsyncFd::register(fd) }? })
    }

    pub async fn write_all(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), bytes).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => bytes = &bytes[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Read what is available, waiting until `deadline`. `Ok(0)` means the deadline passed.
    pub async fn read(&self, buf: &mut [u8], deadline: Instant) -> std::io::Result<usize> {
        let read = async {
            loop {
                let mut guard = self.fd.readable().await?;
                match guard.try_io(|fd| nix::unistd::read(fd.get_ref().as_raw_fd(), buf).map_err(std::io::Error::from))
                {
                    // A read of 0 on a tty whose device vanished: report it as an error.
                    Ok(Ok(0)) => {
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the device went away"))
                    }
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            }
        };
        match tokio::time::timeout_at(deadline, read).await {
            Ok(r) => r,
            Err(_) => Ok(0),
        }
    }

    /// Throw away whatever the device sent that nobody read.
    pub fn discard_input(&self) {
        let _ = termios::tcflush(self.fd.get_ref(), termios::FlushArg::TCIFLUSH);
    }
}

fn open_nonblocking(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: open returned a fresh descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

nix::ioctl_write_ptr_bad!(tiocmbis, libc::TIOCMBIS, libc::c_int);
nix::ioctl_write_ptr_bad!(tiocmbic, libc::TIOCMBIC, libc::c_int);

/// Ask Klipper (or Katapult's USB stack) to reboot into the bootloader: open the port,
/// assert DTR, switch to 1200 baud, drop DTR, close. The firmware reboots on "1200 baud and
/// DTR clear", so anything failing after DTR drops is expected and ignored.
pub fn request_bootloader(path: &Path) -> std::io::Result<()> {
    let fd = open_nonblocking(path)?;
    let dtr: libc::c_int = libc::TIOCM_DTR;
    // SAFETY: TIOCMBIS/TIOCMBIC read one c_int through the pointer, which lives on our stack.
    unsafe { tiocmbis(fd.as_raw_fd(), &dtr) }?;
    let mut t = termios::tcgetattr(&fd)?;
    termios::cfsetspeed(&mut t, BaudRate::B1200)?;
    termios::tcsetattr(fd.as_fd(), SetArg::TCSANOW, &t)?;
    // SAFETY: as above.
    let _ = unsafe { tiocmbic(fd.as_raw_fd(), &dtr) };
    drop(fd);
    Ok(())
}
