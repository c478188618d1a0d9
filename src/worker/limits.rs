//! Limits every child process that runs ONNX Runtime gets (job attempts and inference workers).

use tokio::process::Command;

/// Caps the child's address space at `limit_mb` MiB (0: no cap), so a model that exhausts memory
/// fails its own process instead of pushing the machine into swap or the OOM killer.
pub fn limit_address_space(cmd: &mut Command, limit_mb: u64) {
    if limit_mb == 0 {
        return;
    }
    let bytes = limit_mb.saturating_mul(1 << 20) as libc::rlim_t;
    // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and the
    // closure touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
