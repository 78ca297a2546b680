//! CPU time from /proc: this process's and the whole machine's busy time, to tell what a figure
//! ran next to (the machine may be shared). Used by the delivery and stream sections.

/// CPU time used so far, in clock ticks: by this process, and by the whole machine (busy time).
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    own: u64,
    machine: u64,
}

impl Cpu {
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // after the command name: field 3 (state) first; utime and stime are fields 14 and 15
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let tick = |i: usize| fields.get(i)?.parse::<u64>().ok();
        let own = tick(11)? + tick(12)?;
        let all = std::fs::read_to_string("/proc/stat").ok()?;
        let line = all.lines().next()?.strip_prefix("cpu ")?;
        // user nice system idle iowait irq softirq steal: all but idle and iowait are busy
        let machine = line
            .split_whitespace()
            .take(8)
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum();
        Some(Self { own, machine })
    }

    /// Cores used on average between two readings `secs` apart: (this process, the machine).
    pub fn cores(before: Option<Self>, after: Option<Self>, secs: f64) -> Option<(f64, f64)> {
        let (before, now) = (before?, after?);
        let hz = clock_ticks_per_sec() * secs;
        Some((
            now.own.saturating_sub(before.own) as f64 / hz,
            now.machine.saturating_sub(before.machine) as f64 / hz,
        ))
    }
}

/// The kernel's clock ticks per second (USER_HZ, the unit of /proc's times): 100 on Linux unless
/// `getconf CLK_TCK` says otherwise.
fn clock_ticks_per_sec() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The cores this machine has.
pub fn machine_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
