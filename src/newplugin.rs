//! `otako-gateway new-plugin NAME [--event EVENT] [--lang rust|js|python]`:
//! scaffolds a handler under `plugins/` from the templates in
//! `plugins/templates/` (embedded, so the binary needs no checkout of them),
//! builds it, and routes it in `gateway.toml`, so a new handler runs in
//! `dev` after two commands.
//!
//! Everything is checked before anything is written, and a failed build
//! removes what was scaffolded: an error changes nothing.

use std::path::{Path, PathBuf};

use otako_gateway::config::Config;
use otako_gateway::dev::{self, DevError};

/// The guest language of a new plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A crate in the plugins cargo workspace (wit-bindgen, the Rust SDK).
    Rust,
    /// `handler.js`, built with componentize-js.
    Js,
    /// `app.py`, built with componentize-py.
    Python,
}

impl Lang {
    /// The template files: path inside the plugin folder, contents.
    fn templates(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Lang::Rust => &[
                (
                    "Cargo.toml",
                    include_str!("../plugins/templates/rust/Cargo.toml"),
                ),
                (
                    "src/lib.rs",
                    include_str!("../plugins/templates/rust/src/lib.rs"),
                ),
            ],
            Lang::Js => &[
                (
                    "handler.js",
                    include_str!("../plugins/templates/js/handler.js"),
                ),
                (
                    "handler.test.mjs",
                    include_str!("../plugins/templates/js/handler.test.mjs"),
                ),
            ],
            Lang::Python => &[
                ("app.py", include_str!("../plugins/templates/python/app.py")),
                (
                    "test_app.py",
                    include_str!("../plugins/templates/python/test_app.py"),
                ),
            ],
        }
    }

    /// The route's `timeout_ms` and `memory_mb`: the JS and Python runtimes
    /// start with several MiB of heap and run slower than Rust (BENCHMARKS.md,
    /// "Plugins by language").
    fn limits(self) -> (u64, u32) {
        match self {
            Lang::Rust => (50, 16),
            Lang::Js => (200, 64),
            Lang::Python => (200, 96),
        }
    }

    /// The file an author edits first.
    fn entry(self) -> &'static str {
        match self {
            Lang::Rust => "src/lib.rs",
            Lang::Js => "handler.js",
            Lang::Python => "app.py",
        }
    }
}

/// Folder names under `plugins/` that are not plugins.
const RESERVED: [&str; 8] = [
    "sdk",
    "messages",
    "testing",
    "testhost",
    "templates",
    "toolchain",
    "target",
    "wasm",
];

/// Why `new-plugin` refused or failed; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum NewPluginError {
    #[error(
        "invalid plugin name {0:?}: use 1-48 lower-case letters, digits and '_', starting with a letter"
    )]
    BadName(String),
    #[error("plugin name {0:?} is reserved for the plugins folder's own use")]
    Reserved(String),
    #[error(
        "invalid event name {0:?}: use 1-64 upper-case letters, digits and '_', starting with a letter (e.g. EVENT_TYPING_START)"
    )]
    BadEvent(String),
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error("{event} is already routed to {plugin} in {config}")]
    Routed {
        event: String,
        plugin: PathBuf,
        config: PathBuf,
    },
    #[error("{0} is missing: run new-plugin from the project's folder (next to gateway.toml)")]
    NoProject(PathBuf),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Build(#[from] DevError),
}

/// What a successful run made, for the message printed after it.
#[derive(Debug)]
pub struct Created {
    pub dir: PathBuf,
    pub wasm: PathBuf,
    pub event: String,
    pub entry: PathBuf,
    pub lang: Lang,
}

impl std::fmt::Display for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "created {} ({:?}), built {}, routed {} to it in gateway.toml",
            self.dir.display(),
            self.lang,
            self.wasm.display(),
            self.event
        )?;
        match self.lang {
            Lang::Rust => write!(
                f,
                "next: otako-gateway dev  (then edit {}: dev rebuilds it on save and the next event runs it)",
                self.entry.display()
            ),
            Lang::Js | Lang::Python => write!(
                f,
                "next: otako-gateway dev  (then edit {}: dev rebuilds it on save with scripts/build-lang-plugins.sh and the next event runs it)",
                self.entry.display()
            ),
        }
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NewPluginError {
    let path = path.to_path_buf();
    move |source| NewPluginError::Io {
        action,
        path,
        source,
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 48
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn valid_event(event: &str) -> bool {
    let mut chars = event.chars();
    event.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Scaffolds, builds and routes plugin `name` for the project whose
/// `gateway.toml` is `config_path`.
pub fn run(
    config_path: &Path,
    name: &str,
    event: Option<&str>,
    lang: Lang,
) -> Result<Created, NewPluginError> {
    if !valid_name(name) {
        return Err(NewPluginError::BadName(name.to_owned()));
    }
    if RESERVED.contains(&name) {
        return Err(NewPluginError::Reserved(name.to_owned()));
    }
    let event = match event {
        Some(e) => e.to_owned(),
        None => format!("EVENT_{}", name.to_ascii_uppercase()),
    };
    if !valid_event(&event) {
        return Err(NewPluginError::BadEvent(event));
    }
    let config = Config::load(config_path).map_err(|e| NewPluginError::Config(e.to_string()))?;
    if let Some(route) = config.routes.iter().find(|r| r.event == event) {
        return Err(NewPluginError::Routed {
            event,
            plugin: route.plugin.clone(),
            config: config_path.to_path_buf(),
        });
    }
    let root = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let plugins = root.join("plugins");
    let workspace_manifest = plugins.join("Cargo.toml");
    let build_script = root.join("scripts/build-lang-plugins.sh");
    let needed = match lang {
        Lang::Rust => &workspace_manifest,
        Lang::Js | Lang::Python => &build_script,
    };
    if !needed.is_file() {
        return Err(NewPluginError::NoProject(needed.clone()));
    }
    let dir = plugins.join(name);
    let wasm = plugins.join(format!("{name}.wasm"));
    for path in [&dir, &wasm] {
        if path.exists() {
            return Err(NewPluginError::Exists(path.clone()));
        }
    }
    let config_text = std::fs::read_to_string(config_path).map_err(io("read", config_path))?;
    let (timeout_ms, memory_mb) = lang.limits();
    let routed = add_route(
        &config_text,
        &format!(
            "[[routes]]\nevent      = \"{event}\"\nplugin     = \"plugins/{name}.wasm\"\ntimeout_ms = {timeout_ms}\nmemory_mb  = {memory_mb}\n"
        ),
    );
    // The edited file must still be a valid config before anything changes.
    Config::parse(&routed, config_path).map_err(|e| NewPluginError::Config(e.to_string()))?;
    let manifest_text = match lang {
        Lang::Rust => Some(
            std::fs::read_to_string(&workspace_manifest)
                .map_err(io("read", &workspace_manifest))?,
        ),
        Lang::Js | Lang::Python => None,
    };

    let scaffolded = scaffold(&dir, name, &event, lang).and_then(|()| {
        if let Some(text) = &manifest_text {
            let members = add_member(text, name).ok_or_else(|| {
                NewPluginError::Config(format!(
                    "no `members = [...]` list in {}",
                    workspace_manifest.display()
                ))
            })?;
            write_atomic(&workspace_manifest, &members)?;
        }
        build(root, &plugins, &wasm, name, lang)
    });
    if let Err(err) = scaffolded {
        // Undo: the folder, the workspace entry and any half-copied output.
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&wasm);
        if let Some(text) = &manifest_text {
            let _ = write_atomic(&workspace_manifest, text);
        }
        return Err(err);
    }
    write_atomic(config_path, &routed)?;
    Ok(Created {
        entry: dir.join(lang.entry()),
        dir,
        wasm,
        event,
        lang,
    })
}

fn scaffold(dir: &Path, name: &str, event: &str, lang: Lang) -> Result<(), NewPluginError> {
    let delivers = event.strip_prefix("EVENT_").unwrap_or(event);
    for (file, template) in lang.templates() {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        }
        let text = template
            .replace("{{name}}", name)
            .replace("{{event}}", event)
            .replace("{{delivers}}", delivers);
        std::fs::write(&path, text).map_err(io("write", &path))?;
    }
    Ok(())
}

fn build(
    root: &Path,
    plugins: &Path,
    wasm: &Path,
    name: &str,
    lang: Lang,
) -> Result<(), NewPluginError> {
    match lang {
        Lang::Rust => Ok(dev::build_plugin(plugins, wasm)?),
        Lang::Js | Lang::Python => Ok(dev::build_lang_plugin(root, name)?),
    }
}

/// Writes through a temporary file and a rename, so the hot-reload
/// watcher never reads half a file.
fn write_atomic(path: &Path, text: &str) -> Result<(), NewPluginError> {
    let tmp = path.with_extension("new-plugin.tmp");
    std::fs::write(&tmp, text).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io("replace", path)(e)
    })
}

/// `text` with `block` inserted after the last `[[routes]]` entry (before
/// the next table and the comments that lead into it), or appended when
/// there is no route yet. Everything else stays as it was.
fn add_route(text: &str, block: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let is_route = |l: &str| l.trim_start().starts_with("[[routes]]");
    let Some(last) = lines.iter().rposition(|l| is_route(l)) else {
        let sep = if text.is_empty() || text.ends_with("\n\n") {
            ""
        } else if text.ends_with('\n') {
            "\n"
        } else {
            "\n\n"
        };
        return format!("{text}{sep}{block}");
    };
    // The route's own lines end at the next header that is not its
    // `[routes.config]`.
    let mut end = lines[last + 1..]
        .iter()
        .position(|l| {
            let t = l.trim_start();
            t.starts_with('[') && !t.starts_with("[routes.")
        })
        .map_or(lines.len(), |i| last + 1 + i);
    // Comments and blank lines just above that header belong to it.
    while end > last + 1 {
        let t = lines[end - 1].trim_start();
        if t.is_empty() || t.starts_with('#') {
            end -= 1;
        } else {
            break;
        }
    }
    let mut out: Vec<String> = lines[..end].iter().map(|l| l.to_string()).collect();
    out.push(String::new());
    out.extend(block.lines().map(str::to_owned));
    if lines.get(end).is_some_and(|l| !l.trim().is_empty()) {
        out.push(String::new());
    }
    out.extend(lines[end..].iter().map(|l| l.to_string()));
    let mut joined = out.join("\n");
    joined.push('\n');
    joined
}

/// The workspace manifest with `"name"` added to `members = [...]`, or
/// `None` if it has no such list.
fn add_member(manifest: &str, name: &str) -> Option<String> {
    let start = manifest.find("members = [")?;
    let close = start + manifest[start..].find(']')?;
    // Indent like the last entry, on a line of its own before the `]`.
    let line_start = manifest[..close].rfind('\n').map_or(0, |i| i + 1);
    let (before, after) = manifest.split_at(line_start);
    Some(format!("{before}    \"{name}\",\n{after}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
[plugins]
hot_reload = true

[[routes]]
event      = \"EVENT_A\"
plugin     = \"plugins/a.wasm\"
[routes.config]                      # strings
max = \"1\"

# [[routes]]                         # a commented example stays put
# event = \"EVENT_X\"

# the backend
[api]
listen = \"127.0.0.1:7060\"
";

    #[test]
    fn a_route_goes_after_the_last_one_and_keeps_the_rest() {
        let out = add_route(CONFIG, "[[routes]]\nevent = \"EVENT_B\"\n");
        assert_eq!(
            out,
            CONFIG.replace(
                "max = \"1\"\n",
                "max = \"1\"\n\n[[routes]]\nevent = \"EVENT_B\"\n"
            )
        );
        let none = add_route("[api]\nx = 1\n", "[[routes]]\nevent = \"E\"\n");
        assert_eq!(none, "[api]\nx = 1\n\n[[routes]]\nevent = \"E\"\n");
    }

    #[test]
    fn a_member_is_added_before_the_closing_bracket() {
        let manifest =
            "[workspace]\nmembers = [\n    \"sdk\",\n    \"testing/*\",\n]\nexclude = []\n";
        assert_eq!(
            add_member(manifest, "typing").unwrap(),
            "[workspace]\nmembers = [\n    \"sdk\",\n    \"testing/*\",\n    \"typing\",\n]\nexclude = []\n"
        );
        assert_eq!(add_member("[package]\n", "x"), None);
    }

    #[test]
    fn names_and_events_are_checked() {
        assert!(valid_name("typing_start2"));
        for bad in ["", "Typing", "2x", "a-b", "a b", "../x", &"x".repeat(49)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_event("EVENT_TYPING_START"));
        for bad in ["", "event_x", "EVENT-X", "_X", &"X".repeat(65)] {
            assert!(!valid_event(bad), "{bad}");
        }
    }
}
