//! A configuration as a set of named files: what a configuration
//! directory holds, and what the etcd store keeps under its prefix.
//!
//! Names are relative and few in shape: `NAME.yaml` (the `sluice.yaml`
//! vocabulary), `envoy/NAME.yaml|json` (plain Envoy resources) and
//! `modules/PATH` (a plugin's module, under the `path` its plugin
//! declares). Each file also carries the name it is shown by in messages:
//! the local path of a file being applied, the store's key of one already
//! there.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use sluice_api::config::{Assembly, Resources};
use sluice_api::{Config, ConfigError, ConfigErrorKind, ConfigErrors};

use crate::plain::{Plain, PlainError};

/// What a set loads into: its configuration, and its plain Envoy
/// resources.
pub type Loaded = (
    Result<(Config, Resources), ConfigErrors>,
    Result<Plain, Vec<PlainError>>,
);

/// Where plain Envoy resources sit in a set, as in a directory.
pub const ENVOY: &str = "envoy/";
/// Where plugins' modules sit in a set.
pub const MODULES: &str = "modules/";

/// One file of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub bytes: Vec<u8>,
    /// How messages name it.
    pub shown: String,
}

/// A configuration's files by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSet {
    /// Where the set came from, for messages (`etcd://…/prefix`).
    pub origin: String,
    pub files: BTreeMap<String, File>,
}

/// Why a name cannot be a file of a set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error(
        "`{0}` is not a configuration file: a set holds NAME.yaml (or .yml), envoy/NAME.yaml|json and modules/PATH"
    )]
    NotConfiguration(String),
    #[error("`{0}`: a file name must be relative, without `..`, `.` or empty parts")]
    NotRelative(String),
}

/// What kind of file `name` is, or why it cannot be one.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty()
        || name.starts_with('/')
        || name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(NameError::NotRelative(name.to_owned()));
    }
    let yaml = |n: &str| n.ends_with(".yaml") || n.ends_with(".yml");
    let ok = if let Some(rest) = name.strip_prefix(MODULES) {
        !rest.is_empty()
    } else if let Some(rest) = name.strip_prefix(ENVOY) {
        !rest.contains('/') && (yaml(rest) || rest.ends_with(".json"))
    } else {
        !name.contains('/') && yaml(name)
    };
    if ok {
        Ok(())
    } else {
        Err(NameError::NotConfiguration(name.to_owned()))
    }
}

/// The key a plugin's module is kept under, from the `path` its plugin
/// declares (as written: relative to the configuration, or absolute).
pub fn module_name(path: &Path) -> String {
    let mut parts: Vec<String> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_string_lossy().into_owned()),
            // `..` would leave the set; it is spelt out so distinct paths
            // stay distinct keys.
            Component::ParentDir => Some("_parent_".to_owned()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    if parts.is_empty() {
        // `/`, `.` or nothing: no file, but still a name of its own.
        parts.push("_".to_owned());
    }
    let root = if path.is_absolute() { "_root_/" } else { "" };
    format!("{MODULES}{root}{}", parts.join("/"))
}

fn io_error(file: &str, message: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        line: 0,
        column: 0,
        path: String::new(),
        kind: ConfigErrorKind::Io { message },
    }
}

impl FileSet {
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            files: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) a file; the name is checked.
    pub fn insert(&mut self, name: &str, bytes: Vec<u8>, shown: impl Into<String>) -> Result<(), NameError> {
        check_name(name)?;
        self.files.insert(
            name.to_owned(),
            File {
                bytes,
                shown: shown.into(),
            },
        );
        Ok(())
    }

    fn texts<'a>(&'a self, pick: impl Fn(&str) -> bool + 'a) -> impl Iterator<Item = (&'a str, &'a File)> + 'a {
        self.files
            .iter()
            .filter(move |(name, _)| pick(name))
            .map(|(name, f)| (name.as_str(), f))
    }

    /// The configuration the set holds, validated as a directory's is, and
    /// its plain Envoy resources. Every problem of both at once.
    pub fn load(&self) -> Loaded {
        let mut unreadable = Vec::new();
        let mut text = |f: &File| match std::str::from_utf8(&f.bytes) {
            Ok(t) => Some(t.to_owned()),
            Err(e) => {
                unreadable.push(io_error(&f.shown, format!("not UTF-8 text: {e}")));
                None
            }
        };
        let envoy: Vec<(String, String)> = self
            .texts(|n| n.starts_with(ENVOY))
            .filter_map(|(_, f)| Some((f.shown.clone(), text(f)?)))
            .collect();
        let yaml: Vec<(String, String)> = self
            .texts(|n| !n.contains('/'))
            .filter_map(|(_, f)| Some((f.shown.clone(), text(f)?)))
            .collect();
        let plain = Plain::parse(envoy.iter().map(|(n, t)| (n.as_str(), t.as_str())));
        if yaml.is_empty() && envoy.is_empty() && unreadable.is_empty() {
            unreadable.push(io_error(
                &self.origin,
                "holds no configuration; put one there with `sluice-xds import DIR` or `sluice-xds apply -f`"
                    .to_owned(),
            ));
        }
        let mut assembly = Assembly::new();
        assembly.listeners_defined_elsewhere(plain.as_ref().map(Plain::listener_names).unwrap_or_default());
        for (shown, t) in &yaml {
            assembly.add_file(t, shown);
        }
        let resources = assembly.resources();
        let config = match (assembly.build(), unreadable.is_empty()) {
            (Ok(c), true) => Ok((c, resources)),
            (built, _) => {
                let mut errors = unreadable;
                errors.extend(built.err().map_or_else(Vec::new, |e| e.0));
                Err(ConfigErrors(errors))
            }
        };
        (config, plain)
    }

    /// A plugin's module, by the path its plugin declares.
    pub fn module(&self, path: &Path) -> Result<Vec<u8>, String> {
        let name = module_name(path);
        self.files.get(&name).map(|f| f.bytes.clone()).ok_or_else(|| {
            format!(
                "{} is not in {} (as {name}); apply it with the configuration that names it",
                path.display(),
                self.origin
            )
        })
    }

    /// Reads a configuration directory as `serve --config-dir` reads it:
    /// its `.yaml` files, its `envoy/` files, and the module of every
    /// plugin its files declare (relative to the directory). Nothing is
    /// validated here: a set is checked whole, once merged.
    pub fn read_dir(dir: &Path) -> Result<Self, ConfigErrors> {
        let mut set = Self::new(dir.display().to_string());
        for sub in ["", ENVOY] {
            let d = dir.join(sub);
            let entries = match std::fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if !sub.is_empty() && e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ConfigErrors(vec![io_error(&d.display().to_string(), e.to_string())])),
            };
            let mut names: Vec<String> = entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_file())
                .map(|e| format!("{sub}{}", e.file_name().to_string_lossy()))
                .filter(|n| check_name(n).is_ok())
                .collect();
            names.sort();
            for n in names {
                set.add_file(&n, &dir.join(&n), dir)?;
            }
        }
        if set.files.is_empty() {
            return Err(ConfigErrors(vec![io_error(
                &dir.display().to_string(),
                "holds no .yaml or .yml file (nor envoy/ resources)".to_owned(),
            )]));
        }
        Ok(set)
    }

    /// Reads one file to apply, by its base name (`envoy/NAME` when its
    /// directory is named `envoy`), with the modules of the plugins it
    /// declares (relative to its directory).
    pub fn read_file(path: &Path) -> Result<Self, ConfigErrors> {
        let shown = path.display().to_string();
        let bad = |m: String| ConfigErrors(vec![io_error(&shown, m)]);
        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| bad("not a file".to_owned()))?;
        let parent = path.parent().unwrap_or(Path::new("."));
        let in_envoy = parent.file_name().is_some_and(|d| d == "envoy");
        let name = if in_envoy { format!("{ENVOY}{base}") } else { base };
        let mut set = Self::new(shown.clone());
        set.add_file(&name, path, parent)?;
        Ok(set)
    }

    /// Adds the file at `path` as `name`, and when it is a `sluice.yaml`
    /// file the modules its plugins declare (relative to `base`).
    fn add_file(&mut self, name: &str, path: &Path, base: &Path) -> Result<(), ConfigErrors> {
        let shown = path.display().to_string();
        let bad = |m: String| ConfigErrors(vec![io_error(&shown, m)]);
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        if !name.contains('/') {
            // The plugins it declares, whatever else is wrong with it
            // (the whole configuration is checked once merged).
            let text = std::str::from_utf8(&bytes).map_err(|e| bad(format!("not UTF-8 text: {e}")))?;
            let mut assembly = Assembly::new();
            assembly.add_file(text, &shown);
            for p in assembly.plugin_paths() {
                let at = if p.is_relative() { base.join(&p) } else { p.clone() };
                let module = std::fs::read(&at)
                    .map_err(|e| bad(format!("the module of a plugin it declares, {}: {e}", at.display())))?;
                self.insert(&module_name(&p), module, at.display().to_string())
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        self.insert(name, bytes, shown.clone()).map_err(|e| bad(e.to_string()))
    }

    /// The names of files whose content differs between the two sets, and
    /// of those only one holds.
    pub fn changes(&self, other: &Self) -> Vec<String> {
        let mut out: Vec<String> = self
            .files
            .iter()
            .filter(|(n, f)| other.files.get(*n).is_none_or(|o| o.bytes != f.bytes))
            .map(|(n, _)| n.clone())
            .chain(other.files.keys().filter(|n| !self.files.contains_key(*n)).cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
    use super::*;

    #[test]
    fn names_are_the_shapes_a_directory_has() {
        for ok in [
            "policy.yaml",
            "groups.yml",
            "envoy/l.json",
            "envoy/l.yaml",
            "modules/p/x.wasm",
        ] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for (bad, relative) in [
            ("README.md", false),
            ("envoy/a/b.yaml", false),
            ("sub/policy.yaml", false),
            ("modules/", true),
            ("/etc/policy.yaml", true),
            ("../policy.yaml", true),
            ("modules/../x.yaml", true),
            ("", true),
        ] {
            let e = check_name(bad).unwrap_err();
            assert_eq!(matches!(e, NameError::NotRelative(_)), relative, "{bad}: {e}");
        }
    }

    #[test]
    fn module_names_keep_distinct_paths_apart() {
        assert_eq!(module_name(Path::new("plugins/g.wasm")), "modules/plugins/g.wasm");
        assert_eq!(module_name(Path::new("./plugins/g.wasm")), "modules/plugins/g.wasm");
        assert_eq!(module_name(Path::new("../g.wasm")), "modules/_parent_/g.wasm");
        assert_eq!(module_name(Path::new("/opt/g.wasm")), "modules/_root_/opt/g.wasm");
        for odd in ["/opt/../g.wasm", "", "/", ".", "./", "a/./b", "..."] {
            assert_eq!(check_name(&module_name(Path::new(odd))), Ok(()), "{odd:?}");
        }
    }

    #[test]
    fn a_set_loads_as_its_directory_does() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("policy.yaml"),
            "webgroups:\n  - name: ok\n    domains: [ok.test]\npolicy:\n  default: deny\n  rules:\n    - name: r\n      to: {webgroups: [ok]}\n      action: allow\n",
        )
        .unwrap();
        let from_dir = crate::source::Source::Dir(dir.path().to_path_buf()).load().unwrap();
        let set = FileSet::read_dir(dir.path()).unwrap();
        assert_eq!(set.files.keys().collect::<Vec<_>>(), ["policy.yaml"]);
        let from_set = crate::source::Source::Files(std::sync::Arc::new(set)).load().unwrap();
        assert_eq!(
            crate::diff::versions(&from_dir.catalog),
            crate::diff::versions(&from_set.catalog)
        );
    }

    #[test]
    fn problems_name_the_file_as_shown() {
        let mut set = FileSet::new("etcd://h:1/p");
        set.insert("a.yaml", b"policy:\n  default: maybe\n".to_vec(), "etcd://h:1/p/a.yaml")
            .unwrap();
        set.insert("b.yaml", vec![0xff, 0xfe], "etcd://h:1/p/b.yaml").unwrap();
        let (config, _) = set.load();
        let e = config.unwrap_err().to_string();
        assert!(e.contains("etcd://h:1/p/a.yaml:2:"), "{e}");
        assert!(e.contains("etcd://h:1/p/b.yaml") && e.contains("not UTF-8"), "{e}");
        let (config, _) = FileSet::new("etcd://h:1/p").load();
        let e = config.unwrap_err().to_string();
        assert!(
            e.contains("etcd://h:1/p") && e.contains("holds no configuration"),
            "{e}"
        );
    }

    #[test]
    fn changes_lists_added_changed_and_removed_files() {
        let mut a = FileSet::new("a");
        let mut b = FileSet::new("b");
        a.insert("same.yaml", b"x".to_vec(), "").unwrap();
        b.insert("same.yaml", b"x".to_vec(), "other").unwrap();
        a.insert("changed.yaml", b"1".to_vec(), "").unwrap();
        b.insert("changed.yaml", b"2".to_vec(), "").unwrap();
        a.insert("gone.yaml", b"1".to_vec(), "").unwrap();
        b.insert("new.yaml", b"1".to_vec(), "").unwrap();
        assert_eq!(a.changes(&b), ["changed.yaml", "gone.yaml", "new.yaml"]);
    }
}
