// The data flow's rule, checked by the build: a module may name (`crate::m`) only the
// modules of the layers to its left. Included by netpol-engine's and netpol-agent's
// build.rs; a plain text scan, because a build script cannot ask the compiler.

use std::path::{Path, PathBuf};

/// `layers`: left to right; the modules of one layer may not name each other.
pub fn check(src: &Path, layers: &[&[&str]]) -> Result<(), String> {
    println!("cargo:rerun-if-changed={}", src.display());
    let rank = |m: &str| layers.iter().position(|l| l.contains(&m));
    let mut faults = Vec::new();
    for (layer, modules) in layers.iter().enumerate() {
        for module in *modules {
            for file in files_of(src, module) {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                for (n, line) in text.lines().enumerate() {
                    for named in named_modules(line) {
                        if named == *module {
                            continue;
                        }
                        match rank(named) {
                            Some(r) if r < layer => {}
                            Some(_) => faults.push(format!(
                                "{}:{}: `{module}` names `crate::{named}`, which is not to its left ({})",
                                file.display(),
                                n + 1,
                                layers.iter().map(|l| l.join("|")).collect::<Vec<_>>().join(" -> ")
                            )),
                            None => {}
                        }
                    }
                }
            }
        }
    }
    if faults.is_empty() {
        Ok(())
    } else {
        Err(faults.join("\n"))
    }
}

/// `src/m.rs` and everything under `src/m/`.
fn files_of(src: &Path, module: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        out.push(file);
    }
    let mut dirs = vec![src.join(module)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The modules a line names as `crate::m`, `use crate::{a, b::c}` included; comments skipped.
fn named_modules(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            let end = list.find('}').unwrap_or(list.len());
            for item in list[..end].split(',') {
                let name = item.trim().split("::").next().unwrap_or("").trim();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push(&rest[..end]);
        }
    }
    out
}
