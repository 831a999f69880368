//! BENCHMARKS.md sections: each benchmark owns the text between its two markers and
//! rewrites only that, so several benchmarks share one file.

use anyhow::{Context, Result};
use std::path::Path;

pub fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let start = format!("<!-- {name}:start -->");
    let end = format!("<!-- {name}:end -->");
    let old = if path.exists() {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    } else {
        "# Benchmarks\n\nEach section is written by the command it names.\n".to_string()
    };
    let block = format!("{start}\n{}\n{end}", body.trim_end());
    let new = match (old.find(&start), old.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &old[..a], block, &old[b + end.len()..]),
        _ => format!("{}\n{}\n", old.trim_end(), block),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

/// Date (UTC, YYYY-MM-DD), CPU model and core count, for the header of a result.
pub fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!(
        "{} ({} cores), libtorch threads {}",
        cpu,
        cores,
        tch::get_num_threads()
    )
}

pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    date_of(secs)
}

/// `YYYY-MM-DD` (UTC) of a Unix time in seconds.
pub fn date_of(secs: i64) -> String {
    mp_core::agreement::day_of(secs.max(0) as u64 * 1000)
}

/// Mean and sample standard deviation.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("B.md");
        write_section(&p, "a", "one").unwrap();
        write_section(&p, "b", "two").unwrap();
        write_section(&p, "a", "three").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains("three") && s.contains("two") && !s.contains("one"));
        assert!(s.find("three").unwrap() < s.find("two").unwrap());
        assert_eq!(today().len(), 10);
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (sd - 1.0).abs() < 1e-12);
    }
}

/// The benchmark's own arguments (after `mp bench NAME`) as a reader can rerun them: a path
/// inside a set-up location is written with its variable (`$MP_RESNET18_MODULE`,
/// `$MP_CACHE_DIR/…`), any other absolute path as its file name.
pub fn command_args() -> String {
    let vars: Vec<(String, String)> = ["MP_RESNET18_MODULE", "MP_MNIST_DIR", "MP_CACHE_DIR"]
        .iter()
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (k.to_string(), v))
        })
        .collect();
    std::env::args()
        .skip(3)
        .map(|a| shown_arg(&a, &vars))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shown_arg(a: &str, vars: &[(String, String)]) -> String {
    for (k, v) in vars {
        if let Some(rest) = a.strip_prefix(v.as_str()) {
            if rest.is_empty() || rest.starts_with('/') {
                return format!("${k}{rest}");
            }
        }
    }
    let p = std::path::Path::new(a);
    if p.is_absolute() {
        if let Some(f) = p.file_name() {
            return f.to_string_lossy().into_owned();
        }
    }
    a.to_string()
}

#[cfg(test)]
mod command_tests {
    use super::shown_arg;

    #[test]
    fn set_up_paths_become_variables_and_other_absolute_paths_file_names() {
        let vars = vec![
            (
                "MP_RESNET18_MODULE".to_string(),
                "/c/models/r.pt".to_string(),
            ),
            ("MP_CACHE_DIR".to_string(), "/c".to_string()),
        ];
        assert_eq!(shown_arg("/c/models/r.pt", &vars), "$MP_RESNET18_MODULE");
        assert_eq!(shown_arg("/c/mnist/x", &vars), "$MP_CACHE_DIR/mnist/x");
        assert_eq!(shown_arg("/cx/y.pt", &vars), "y.pt");
        assert_eq!(shown_arg("--side", &vars), "--side");
        assert_eq!(shown_arg("data/x", &vars), "data/x");
    }
}
