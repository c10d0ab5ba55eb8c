//! Where a local cluster's processes write their logs when they are not shown: one file per
//! process in a private directory, removed with the cluster. When the cluster is dropped
//! during a panic (a failing test), the last lines of each are printed, so a failure on a CI
//! machine says what the router and nodes were doing.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use moe_cluster::auth;

/// Lines of each log printed when a test fails.
const LINES_ON_FAILURE: usize = 40;

#[derive(Debug)]
pub struct MemberLogs {
    dir: PathBuf,
}

impl MemberLogs {
    pub fn create() -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "moe-cluster-logs-{}-{}",
            std::process::id(),
            auth::hex(&auth::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// A fresh file for the process `name` (its stderr).
    pub fn file(&self, name: &str) -> std::io::Result<File> {
        File::create(self.path(name))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// The last `keep` lines `name` wrote, without colours, blank lines or backtraces (an
    /// error's backtrace would push the error itself out).
    pub fn tail(&self, name: &str, keep: usize) -> Vec<String> {
        tail_of(&self.path(name), keep)
    }

    /// Every log's last lines, oldest process first.
    fn print_tails(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|e| {
                let created = e
                    .metadata()
                    .and_then(|m| m.created().or_else(|_| m.modified()))
                    .unwrap_or(std::time::UNIX_EPOCH);
                (created, e.path())
            })
            .collect();
        logs.sort();
        for (_, path) in logs {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            eprintln!("---- last lines of {name} ----");
            for line in tail_of(&path, LINES_ON_FAILURE) {
                eprintln!("{line}");
            }
        }
    }
}

fn tail_of(path: &Path, keep: usize) -> Vec<String> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    let mut last = std::collections::VecDeque::with_capacity(keep + 1);
    let mut in_backtrace = false;
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        let line = strip_ansi(&line);
        if line.starts_with("Stack backtrace:") {
            in_backtrace = true;
        } else if !line.starts_with(' ') {
            in_backtrace = false;
        }
        if in_backtrace || line.trim().is_empty() {
            continue;
        }
        last.push_back(line);
        if last.len() > keep {
            last.pop_front();
        }
    }
    last.into_iter().collect()
}

/// `line` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for MemberLogs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_tails();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Colours go, backtraces and blank lines are skipped, only the last lines stay.
    #[test]
    fn tails_keep_the_last_plain_lines() {
        let logs = MemberLogs::create().unwrap();
        let text = "\u{1b}[2mfirst\u{1b}[0m\n\nsecond\nStack backtrace:\n   0: frame\nthird\n";
        std::fs::write(logs.path("node-0"), text).unwrap();
        assert_eq!(logs.tail("node-0", 2), ["second", "third"]);
        assert_eq!(logs.tail("node-0", 5), ["first", "second", "third"]);
        assert!(logs.tail("absent", 3).is_empty());
        let dir = logs.dir.clone();
        drop(logs);
        assert!(!dir.exists());
    }
}
