//! What the bench reads of the operating system: /proc figures of the server and of itself,
//! and the open-files limit.

/// Makes the soft RLIMIT_NOFILE at least `needed` if the hard limit allows (with the
/// `prlimit` tool: this crate has no libc). Returns a note when the limit stays too low.
pub(crate) fn ensure_fd_limit(needed: u64) -> Option<String> {
    let (soft, hard) = read_nofile_limits()?;
    if soft >= needed {
        return None;
    }
    if hard > soft {
        let hard_text = if hard == u64::MAX {
            "unlimited".to_owned()
        } else {
            hard.to_string()
        };
        let status = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard_text}:{hard_text}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if let Ok(status) = status
            && status.success()
            && let Some((soft, _)) = read_nofile_limits()
            && soft >= needed
        {
            eprintln!("raised the open-files limit to {hard_text}");
            return None;
        }
    }
    let (soft, hard) = read_nofile_limits().unwrap_or((soft, hard));
    Some(format!(
        "open-files limit is {soft} (hard {hard}) but {needed} descriptors are needed: \
         connections past the limit will fail with EMFILE (raise it with `ulimit -n`)"
    ))
}

/// (soft, hard) "Max open files" of this process, from /proc/self/limits.
pub(crate) fn read_nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let parse = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    Some((parse(fields.next()?)?, parse(fields.next()?)?))
}

/// utime + stime of a process (all its threads), in clock ticks.
pub(crate) fn read_cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state).
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` line of /proc/PID/status, e.g. `VmRSS:`.
pub(crate) fn read_status_kib(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// `getconf CLK_TCK`, 100 if that fails.
pub(crate) fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}
