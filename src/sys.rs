//! Process-level settings the gateway needs from the OS.

/// Raises the open-file limit and returns the new soft limit: to
/// [`FD_TARGET`] where the process may raise its hard limit (root), else to
/// the hard limit. Every client session is a socket, and the usual soft
/// default (1024) would cap the gateway at about that many sessions.
#[cfg(unix)]
pub fn raise_fd_limit() -> std::io::Result<libc::rlim_t> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the `rlimit` we pass,
    // which lives on this stack frame for the whole call.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let target = libc::rlimit {
            rlim_cur: FD_TARGET,
            rlim_max: limit.rlim_max.max(FD_TARGET),
        };
        if limit.rlim_cur < FD_TARGET && libc::setrlimit(libc::RLIMIT_NOFILE, &target) == 0 {
            return Ok(FD_TARGET);
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// A TCP listener on `addr` whose accept queue holds `backlog` connections
/// (the kernel caps it at `net.core.somaxconn`). Tokio's `bind` asks for 128.
pub fn listen(
    addr: std::net::SocketAddr,
    backlog: u32,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Clock ticks per second, the unit of the CPU times in `/proc/<pid>/stat`.
#[cfg(unix)]
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a constant of the running system.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// The open-file limit asked for: Linux's default `fs.nr_open`.
#[cfg(unix)]
pub const FD_TARGET: libc::rlim_t = 1 << 20;

/// Not needed off unix.
#[cfg(not(unix))]
pub fn raise_fd_limit() -> std::io::Result<u64> {
    Ok(0)
}
