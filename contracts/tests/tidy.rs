//! Rules of the source layout, checked mechanically: every Rust source file of the workspace
//! opens with its `//!` documentation, and the modules of `fleet-contracts` depend on each
//! other one way only (a module names only modules of a lower layer), so no import circle can
//! come back.

use std::path::{Path, PathBuf};

/// The workspace root (this crate is one level below it).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("contracts sits in the workspace")
        .to_owned()
}

/// Every `.rs` file under `dir`, build output and hidden folders left out.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "node_modules" {
                sources(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_source_file_opens_with_its_documentation() {
    let mut files = Vec::new();
    sources(&workspace(), &mut files);
    assert!(files.len() > 50, "found only {} source files", files.len());
    let undocumented: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().starts_with("//!"))
        .map(|f| f.strip_prefix(workspace()).unwrap().display().to_string())
        .collect();
    assert!(
        undocumented.is_empty(),
        "these files do not open with `//!` documentation: {undocumented:?}"
    );
}

/// The layers of `fleet-contracts`, lowest first. A module may name modules of lower layers
/// only: names and value checks at the bottom, then the pod template, the KV values, the
/// documents and the request/reply messages, the HTTP bodies on top.
const LAYERS: &[&[&str]] = &[
    &["names", "checks", "document", "boot"],
    &["spec"],
    &["state"],
    &["resource", "rpc"],
    &["api"],
    &["testing"],
];

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer of LAYERS"))
}

#[test]
fn contracts_modules_depend_one_way() {
    let src = workspace().join("contracts/src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" {
            continue;
        }
        let own = layer(&module);
        let text: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for used in crate_modules_named(&text) {
            // Root items (FieldError, Labels, the versions) are below every module.
            if used.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && used != module
                && layer(&used) >= own
            {
                wrong.push(format!("{}: {module} names {used}", rel.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers: {wrong:#?}");
}

/// The first segment of every path after `crate::` in `text`, also inside groups
/// (`crate::{Labels, spec::PodTemplate}` names `Labels` and `spec`, over several lines too).
fn crate_modules_named(text: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            out.push(ident(rest));
            continue;
        };
        // The group's top-level items, up to its closing brace.
        let (mut depth, mut item) = (0, String::new());
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(ident(&item));
                    item.clear();
                    continue;
                }
                _ => {}
            }
            if depth == 0 || c == '{' {
                item.push(c);
            }
        }
        out.push(ident(&item));
    }
    out.retain(|m| !m.is_empty());
    out
}

#[test]
fn grouped_imports_are_read_too() {
    assert_eq!(
        crate_modules_named(
            "use crate::{\n    Labels, SCHEMA_VERSION,\n    spec::{Container, Probe},\n};\nx = crate::state::Phase;"
        ),
        ["Labels", "SCHEMA_VERSION", "spec", "state"]
    );
}
