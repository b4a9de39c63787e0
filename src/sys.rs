//! Process-level settings the gateway needs from the OS.

/// Raises the soft open-file limit to the hard limit and returns the new
/// soft limit. Every client session is a socket, and the usual soft default
/// (1024) would cap the gateway at about that many sessions.
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

/// Not needed off unix.
#[cfg(not(unix))]
pub fn raise_fd_limit() -> std::io::Result<u64> {
    Ok(0)
}
