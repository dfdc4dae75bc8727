//! Checks of the values a person writes that end up as something else: an image reference
//! and a path become podman arguments, a probe's path becomes an HTTP request line. Each
//! check allows what that consumer reads as one plain value, and nothing it could read as an
//! option, a separator or a second line. The error says why, for the field's message.

/// The longest image reference accepted (the OCI grammar bounds the name at 255).
pub const MAX_IMAGE_LEN: usize = 512;
/// The longest repository name in an image reference, as the OCI distribution spec says.
const MAX_IMAGE_NAME_LEN: usize = 255;
/// The longest path accepted (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// The longest probe path accepted.
pub const MAX_URL_PATH_LEN: usize = 2048;

/// Checks an image reference against the OCI distribution grammar:
/// `[host[:port]/]path[/path...][:tag][@algorithm:hex]`, path components lower-case.
pub fn check_image(reference: &str) -> Result<(), String> {
    if reference.is_empty() {
        return Err("must not be empty".into());
    }
    if reference.len() > MAX_IMAGE_LEN {
        return Err(format!(
            "must be at most {MAX_IMAGE_LEN} characters, got {}",
            reference.len()
        ));
    }
    if let Some(c) = reference.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("must not contain {c:?}"));
    }
    if reference.starts_with('-') {
        return Err("must not start with '-'".into());
    }
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (reference, None),
    };
    if let Some(digest) = digest {
        check_digest(digest)?;
    }
    // A tag follows the last ':' that comes after the last '/' (a ':' before it is a port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        check_tag(tag)?;
    }
    if name.is_empty() {
        return Err("has no repository name".into());
    }
    if name.len() > MAX_IMAGE_NAME_LEN {
        return Err(format!(
            "repository name must be at most {MAX_IMAGE_NAME_LEN} characters"
        ));
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let first = components[0];
    if components.len() > 1 && (first.contains('.') || first.contains(':') || first == "localhost")
    {
        check_registry(first)?;
        components.remove(0);
    }
    for component in components {
        check_path_component(component)?;
    }
    Ok(())
}

fn check_registry(host: &str) -> Result<(), String> {
    let bad =
        || format!("registry {host:?} must be a host name or IP address, with an optional :port");
    let (host_part, port) = if let Some(v6) = host.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or_else(bad)?;
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return Err(bad());
        }
        let port = match after {
            "" => None,
            after => Some(after.strip_prefix(':').ok_or_else(bad)?),
        };
        (None, port)
    } else {
        match host.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(host), None),
        }
    };
    if let Some(h) = host_part {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !h.split('.').all(label_ok) {
            return Err(bad());
        }
    }
    if let Some(p) = port
        && (!p.chars().all(|c| c.is_ascii_digit()) || !matches!(p.parse::<u16>(), Ok(1..)))
    {
        return Err(bad());
    }
    // `transport:...` is how podman names an image elsewhere than a registry (a local
    // archive, the docker daemon): never a registry host.
    if let Some(h) = host_part
        && TRANSPORTS.contains(&h)
    {
        return Err(format!(
            "{h:?} is a podman transport, not a registry: images come from registries only"
        ));
    }
    Ok(())
}

/// The transports of containers/image, which podman would read before a ':'.
const TRANSPORTS: &[&str] = &[
    "containers-storage",
    "dir",
    "docker",
    "docker-archive",
    "docker-daemon",
    "oci",
    "oci-archive",
    "ostree",
    "sif",
    "tarball",
];

/// `[a-z0-9]+` joined by `.`, `_`, `__` or one or more `-`.
fn check_path_component(c: &str) -> Result<(), String> {
    let why = || {
        format!(
            "repository path component {c:?} must be lower-case letters and digits, joined by \
             '.', '_', '__' or '-'"
        )
    };
    if c.is_empty() {
        return Err("repository name has an empty path component ('//' or a trailing '/')".into());
    }
    let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
    let bytes: Vec<char> = c.chars().collect();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(why());
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep: String = bytes[start..i].iter().collect();
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|ch| ch == '-');
        if !ok {
            return Err(why());
        }
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let ok = tag.len() <= 128
        && tag.chars().next().is_some_and(word)
        && tag.chars().all(|c| word(c) || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must be 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        ))
    }
}

/// `algorithm:hex`, e.g. `sha256:` and 64 hex digits.
fn check_digest(digest: &str) -> Result<(), String> {
    let why = || {
        format!("digest {digest:?} must be algorithm:hex, e.g. sha256:<64 lower-case hex digits>")
    };
    let (algorithm, hex) = digest.split_once(':').ok_or_else(why)?;
    let algorithm_ok = algorithm
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && algorithm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+._-".contains(c));
    let lower_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
    if !algorithm_ok || hex.len() < 32 || !hex.chars().all(lower_hex) {
        return Err(why());
    }
    if algorithm == "sha256" && hex.len() != 64 {
        return Err(why());
    }
    Ok(())
}

/// Checks a path as one clean absolute path: starting with `/`, no `//`, no `.` or `..`
/// component, no trailing `/` (but `/` itself), no `:` (podman's `--volume` separator), no
/// control character.
pub fn check_abs_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("must be an absolute path".into());
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!("must be at most {MAX_PATH_LEN} characters"));
    }
    if let Some(c) = path.chars().find(|c| c.is_control() || *c == ':') {
        return Err(format!("must not contain {c:?}"));
    }
    if path == "/" {
        return Ok(());
    }
    let clean = path[1..]
        .split('/')
        .all(|c| !c.is_empty() && c != "." && c != "..");
    if !clean {
        return Err(format!(
            "must be a clean path: no '//', '.' or '..' component and no trailing '/' (did you mean {:?}?)",
            clean_path(path)
        ));
    }
    Ok(())
}

/// `path` with empty and `.` components dropped and `..` applied.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Checks the path of an HTTP GET: `/`, then visible ASCII only (percent-encode the rest), no
/// fragment. Nothing in it can end the request line or add a header.
pub fn check_url_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("must start with /".into());
    }
    if path.len() > MAX_URL_PATH_LEN {
        return Err(format!("must be at most {MAX_URL_PATH_LEN} characters"));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic() || *c == '#') {
        return Err(format!(
            "must be visible ASCII without '#' (percent-encode other characters), found {c:?}"
        ));
    }
    Ok(())
}

/// The most apt sources one OS release may name.
pub const MAX_APT_SOURCES: usize = 8;
/// The most packages one OS release may pin.
pub const MAX_PACKAGES: usize = 4096;

/// Checks an OS release's name: 1-63 bytes of letters, digits and `.+~_-`, starting with a
/// letter or digit. It becomes a line of `/etc/fleet/os-release` and a word in apt's log.
pub fn check_release_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("must be 1-63 characters, got {}", name.len()));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit".into());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ".+~_-".contains(*c)))
    {
        Some(c) => Err(format!("found {c:?}; letters, digits and .+~_- only")),
        None => Ok(()),
    }
}

/// Checks a Debian package name as apt reads it in `name=version`: lower-case letters,
/// digits and `+-.`, at least two characters, starting with a letter or digit (Debian
/// policy 5.6.1). Nothing apt could take for an option or a second package.
pub fn check_package_name(name: &str) -> Result<(), String> {
    if name.len() < 2 || name.len() > 128 {
        return Err(format!("must be 2-128 characters, got {}", name.len()));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err("must start with a lower-case letter or digit".into());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(*c)))
    {
        Some(c) => Err(format!(
            "found {c:?}; lower-case letters, digits and +-. only"
        )),
        None => Ok(()),
    }
}

/// Checks a Debian version (`[epoch:]upstream[-revision]`, policy 5.6.12): starts with a
/// digit, then letters, digits and `.+~:-`; at most 128 bytes.
pub fn check_package_version(version: &str) -> Result<(), String> {
    if version.is_empty() || version.len() > 128 {
        return Err(format!("must be 1-128 characters, got {}", version.len()));
    }
    if !version.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("must start with a digit".into());
    }
    match version
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ".+~:-".contains(*c)))
    {
        Some(c) => Err(format!("found {c:?}; letters, digits and .+~:- only")),
        None => Ok(()),
    }
}

/// A character that changes how text around it shows rather than showing itself: a control
/// character (newline, escape) or an invisible Unicode format character (zero-width, bidi
/// embedding, override and isolate marks). Refused in text a terminal, a log or a reason line
/// will show, or replaced there.
pub fn is_unshowable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}')
}

/// `text` with every [`is_unshowable`] character replaced by `?`.
pub fn showable(text: &str) -> String {
    text.chars()
        .map(|c| if is_unshowable(c) { '?' } else { c })
        .collect()
}

/// The most check-in commands one OS upgrade may name.
pub const MAX_CHECK_IN_COMMANDS: usize = 8;
/// The most words (program and arguments) of one check-in command.
pub const MAX_CHECK_IN_WORDS: usize = 32;
/// The longest word of a check-in command, in bytes.
pub const MAX_CHECK_IN_WORD_LEN: usize = 1024;

/// Checks one check-in command's words: the program a clean absolute path, 1 to
/// [`MAX_CHECK_IN_WORDS`] words of at most [`MAX_CHECK_IN_WORD_LEN`] bytes, none holding an
/// [`is_unshowable`] character (an argv word cannot hold a NUL; a newline, an escape or a bidi
/// override would garble the rollback's reason, the logs and `fleetctl`). It runs without a shell: nothing in it is expanded.
/// On error, the index of the bad word and why.
pub fn check_check_in_command(words: &[String]) -> Result<(), (Option<usize>, String)> {
    if words.is_empty() || words.len() > MAX_CHECK_IN_WORDS {
        return Err((
            None,
            format!(
                "must hold 1-{MAX_CHECK_IN_WORDS} words (the program, then its arguments), got {}",
                words.len()
            ),
        ));
    }
    for (i, w) in words.iter().enumerate() {
        if w.len() > MAX_CHECK_IN_WORD_LEN {
            return Err((
                Some(i),
                format!(
                    "must be at most {MAX_CHECK_IN_WORD_LEN} bytes, got {}",
                    w.len()
                ),
            ));
        }
        if let Some(c) = w.chars().find(|c| is_unshowable(*c)) {
            return Err((Some(i), format!("must not contain {c:?}")));
        }
    }
    check_abs_path(&words[0])
        .map_err(|e| (Some(0), format!("the program {e} (no shell looks it up)")))?;
    Ok(())
}

/// Checks an apt one-line source, which the device writes as one line of a sources file:
/// `deb [key=value ...] http(s)://host[:port]/path suite [component ...]`. Every word is
/// printable ASCII without quotes, `#` or `\`; no second line, no comment, no option apt
/// reads from a local file (`signed-by`, which would let the source name any key on the
/// device, is allowed only with a path under `/usr/share/keyrings/`).
pub fn check_apt_source(line: &str) -> Result<(), String> {
    if line.len() > 1024 {
        return Err(format!(
            "must be at most 1024 characters, got {}",
            line.len()
        ));
    }
    if let Some(c) = line
        .chars()
        .find(|c| !(c.is_ascii_graphic() || *c == ' ') || "\"'#\\`$".contains(*c))
    {
        return Err(format!("must not contain {c:?}"));
    }
    let mut words = line.split(' ').filter(|w| !w.is_empty());
    if words.next() != Some("deb") {
        return Err("must start with \"deb \" (binary packages)".into());
    }
    let mut word = words.next().ok_or("names no URI")?;
    if let Some(first) = word.strip_prefix('[') {
        // Options: `[a=b c=d]`, each word `key=value`.
        let mut option = first;
        loop {
            let (text, last) = match option.strip_suffix(']') {
                Some(t) => (t, true),
                None => (option, false),
            };
            if !text.is_empty() {
                let Some((key, value)) = text.split_once('=') else {
                    return Err(format!("option {text:?} is not key=value"));
                };
                let plain = |s: &str| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.,/".contains(c))
                };
                if !plain(key) || !plain(value) || key.contains('/') {
                    return Err(format!("option {text:?} is not a plain key=value"));
                }
                if key == "signed-by" && !value.starts_with("/usr/share/keyrings/") {
                    return Err("signed-by must name a keyring under /usr/share/keyrings/".into());
                }
                if value.contains("..") {
                    return Err(format!("option {text:?} must not contain '..'"));
                }
            }
            if last {
                break;
            }
            option = words.next().ok_or("options '[' are not closed with ']'")?;
        }
        word = words.next().ok_or("names no URI")?;
    }
    let rest = word
        .strip_prefix("http://")
        .or_else(|| word.strip_prefix("https://"))
        .ok_or_else(|| format!("URI {word:?} must be http:// or https://"))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.starts_with('-') {
        return Err(format!("URI {word:?} names no host"));
    }
    let suite = words.next().ok_or("names no suite")?;
    for w in std::iter::once(suite).chain(words) {
        if w.starts_with('-') || w.contains("..") {
            return Err(format!("suite or component {w:?} is not a plain word"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn apt_sources_are_one_plain_line() {
        for ok in [
            "deb http://deb.debian.org/debian trixie main non-free-firmware",
            "deb [trusted=yes] http://10.0.2.2:8000/ ./",
            "deb [arch=arm64 signed-by=/usr/share/keyrings/fleet.gpg] https://apt.example.com/x trixie main",
        ] {
            assert_eq!(check_apt_source(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            (
                "deb http://x/ ./\ndeb http://evil/ ./",
                "must not contain '\\n'",
            ),
            ("deb-src http://x/ ./", "must start with \"deb \""),
            ("deb file:///etc ./", "must be http:// or https://"),
            ("deb http://x/ ./ # c", "must not contain '#'"),
            (
                "deb [signed-by=/etc/shadow] http://x/ ./",
                "signed-by must name",
            ),
            (
                "deb [signed-by=/usr/share/keyrings/../../etc/k] http://x/ ./",
                "'..'",
            ),
            ("deb [trusted=yes http://x/ ./", "is not key=value"),
            ("deb [trusted=yes", "not closed"),
            ("deb http://x/", "names no suite"),
            ("deb http://x/ -o", "not a plain word"),
            ("deb http:///path ./", "names no host"),
            ("deb http://x/ $(reboot)", "must not contain '$'"),
        ] {
            let err = check_apt_source(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn package_names_and_versions_are_what_debian_allows() {
        for ok in ["libc6", "g++", "linux-image-6.12.57+deb13-arm64", "0ad"] {
            assert_eq!(check_package_name(ok), Ok(()), "{ok}");
        }
        for bad in ["a", "-o", "Foo", "a b", "a=1", "a/b", "a:arm64"] {
            assert!(check_package_name(bad).is_err(), "{bad}");
        }
        for ok in ["1", "2:1.2.3-4+deb13u1", "1.0~rc1", "6.12.57-1"] {
            assert_eq!(check_package_version(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a1", "1 2", "1/2", "1;reboot", "-1"] {
            assert!(check_package_version(bad).is_err(), "{bad}");
        }
        for bad in ["", ".x", "a b", "a\n", &"x".repeat(64)] {
            assert!(check_release_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_release_name("2026.12.1+pi~rc_1-x"), Ok(()));
    }
    use super::*;

    #[test]
    fn image_references() {
        for ok in [
            "alpine",
            "alpine:3.20",
            "docker.io/library/alpine:3.20",
            "localhost/fleet-example-http:1",
            "localhost:5000/a/b__c.d-e---f:v1.0_x",
            "registry.example.com:443/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "[::1]:5000/app:1",
            "ghcr.io/org/app:latest@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(check_image(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "must not be empty"),
            ("--privileged", "must not start with '-'"),
            ("-x", "must not start with '-'"),
            ("alpine latest", "must not contain ' '"),
            ("alpine\n", "must not contain '\\n'"),
            ("Alpine", "\"Alpine\" must be lower-case"),
            ("a//b", "empty path component"),
            ("a/", "empty path component"),
            ("a:", "tag \"\""),
            ("a:-x", "tag \"-x\""),
            ("a@sha256:12", "digest"),
            ("a@sha256:zz", "digest"),
            ("a..b", "must be lower-case"),
            ("a_-b", "must be lower-case"),
            ("bad_host.com:x/a", "registry"),
            ("-bad.com/a", "must not start with '-'"),
            ("ünïcode", "must not contain 'ü'"),
            ("docker-archive:1/x", "is a podman transport"),
            ("oci-archive:5000/tmp/x", "is a podman transport"),
            ("docker-daemon:1/x:latest", "is a podman transport"),
            ("localhost:70000/x", "registry"),
            ("localhost:0/x", "registry"),
            (
                "a@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
                "lower-case",
            ),
        ] {
            let got = check_image(bad).unwrap_err();
            assert!(got.contains(why), "{bad:?}: {got}");
        }
        assert!(check_image(&"a".repeat(256)).is_err());
        assert!(check_image(&format!("a:{}", "t".repeat(129))).is_err());
    }

    #[test]
    fn paths() {
        for ok in ["/", "/data", "/srv/a b/c-d_e.f", "/.hidden/x"] {
            assert_eq!(check_abs_path(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("data", "absolute"),
            ("", "absolute"),
            ("/data:O", "':'"),
            ("/etc:/evil", "':'"),
            ("/a\0b", "'\\0'"),
            ("/a\nb", "'\\n'"),
            ("/data/", "did you mean \"/data\""),
            ("/a//b", "did you mean \"/a/b\""),
            ("/a/../etc", "did you mean \"/etc\""),
            ("/a/./b", "did you mean \"/a/b\""),
        ] {
            let got = check_abs_path(bad).unwrap_err();
            assert!(got.contains(why), "{bad:?}: {got}");
        }
    }

    #[test]
    fn url_paths() {
        assert_eq!(check_url_path("/healthz?full=1&x=%20"), Ok(()));
        for bad in [
            "healthz",
            "/a\r\nX-Evil: 1",
            "/a b",
            "/a\tb",
            "/ä",
            "/a#frag",
        ] {
            assert!(check_url_path(bad).is_err(), "{bad:?}");
        }
    }
}
