//! Board keys: short slugs made from display names, compatible with kalico-flash's keys.

use unicode_normalization::UnicodeNormalization;

pub const MAX_KEY_LEN: usize = 64;

/// "Octopus Pro v1.1" → `octopus-pro-v1-1`; "Café  MCU__x" → `cafe-mcu-x`.
/// Returns `None` when nothing usable is left.
pub fn slugify(name: &str) -> Option<String> {
    let ascii: String = name.nfkd().filter(char::is_ascii).collect();
    let mut out = String::new();
    for c in ascii.to_ascii_lowercase().chars() {
        let c = match c {
            ' ' | '_' | '.' | '-' => '-',
            c if c.is_ascii_alphanumeric() => c,
            _ => continue,
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
    }
    out.truncate(MAX_KEY_LEN);
    let out = out.trim_end_matches('-').to_string();
    (!out.is_empty()).then_some(out)
}

/// The slug of `name`, with `-2`, `-3`… appended until `taken` says it is free.
pub fn unique_key(name: &str, taken: impl Fn(&str) -> bool) -> Option<String> {
    let base = slugify(name)?;
    if !taken(&base) {
        return Some(base);
    }
    (2..).find_map(|n| {
        let suffix = format!("-{n}");
        let head = &base[..base.len().min(MAX_KEY_LEN - suffix.len())];
        let candidate = format!("{}{suffix}", head.trim_end_matches('-'));
        (!taken(&candidate)).then_some(candidate)
    })
}

/// A key typed by the user must already be a slug.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key.as_bytes()[0].is_ascii_alphanumeric()
        && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_like_the_original() {
        assert_eq!(slugify("Octopus Pro v1.1").as_deref(), Some("octopus-pro-v1-1"));
        assert_eq!(slugify("Café  MCU__x").as_deref(), Some("cafe-mcu-x"));
        assert_eq!(slugify("  --EBB36!! "), Some("ebb36".into()));
        assert_eq!(slugify("✓✓"), None);
        assert_eq!(slugify(&"a".repeat(80)).unwrap().len(), 64);
    }

    #[test]
    fn collisions_get_numbered() {
        let taken = ["ebb", "ebb-2"];
        assert_eq!(unique_key("EBB", |k| taken.contains(&k)).as_deref(), Some("ebb-3"));
        let long = "x".repeat(64);
        let k = unique_key(&long, |k| k == long).unwrap();
        assert!(k.len() <= 64 && k.ends_with("-2"));
    }

    #[test]
    fn key_validation() {
        assert!(is_valid_key("octopus-pro"));
        assert!(!is_valid_key("Octopus"));
        assert!(!is_valid_key("-x"));
        assert!(!is_valid_key(""));
    }
}
