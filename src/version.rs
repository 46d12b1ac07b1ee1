//! Firmware versions as Klipper embeds them: `git describe --always --tags --long --dirty`,
//! plus `-YYYYMMDD_HHMMSS-<host>` for dirty builds. Only an exact match means "already
//! running this build"; the parse tells the user how far apart two versions are.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Describe {
    /// `v0.13.0`, `v2026.07.00`; `None` for a bare hash.
    pub tag: Option<String>,
    /// Commits since the tag.
    pub commits: Option<u32>,
    pub hash: Option<String>,
    pub dirty: bool,
    /// The timestamp-and-host suffix of a dirty build.
    pub build_suffix: Option<String>,
}

impl Describe {
    pub fn parse(v: &str) -> Option<Describe> {
        let v = v.trim();
        if v.is_empty() || v == "?" {
            return None;
        }
        let (base, dirty, build_suffix) = match v.find("-dirty") {
            Some(i) => {
                let rest = v[i + "-dirty".len()..].trim_start_matches('-');
                (&v[..i], true, (!rest.is_empty()).then(|| rest.to_string()))
            }
            None => (v, false, None),
        };
        // tag-N-gHASH, with a tag that may itself contain '-'.
        let parts: Vec<&str> = base.rsplitn(3, '-').collect();
        if parts.len() == 3 && parts[0].starts_with('g') && parts[1].bytes().all(|b| b.is_ascii_digit()) {
            return Some(Describe {
                tag: Some(parts[2].to_string()),
                commits: parts[1].parse().ok(),
                hash: Some(parts[0][1..].to_string()),
                dirty,
                build_suffix,
            });
        }
        if base.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(Describe { tag: None, commits: None, hash: Some(base.to_string()), dirty, build_suffix });
        }
        Some(Describe { tag: Some(base.to_string()), commits: None, hash: None, dirty, build_suffix })
    }
}

/// How a running version relates to the one just built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relation {
    /// Exactly this build.
    Same,
    /// The same tag, N commits behind.
    Behind(u32),
    /// The same tag, N commits ahead (a downgrade).
    Ahead(u32),
    /// The same commit but another build (dirty tree, other build time).
    OtherBuild,
    /// Anything else (another tag, unparseable): different, direction unknown.
    Different,
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Relation::Same => write!(f, "up to date"),
            Relation::Behind(n) => write!(f, "{n} commit{} behind", if *n == 1 { "" } else { "s" }),
            Relation::Ahead(n) => {
                write!(f, "{n} commit{} ahead (this flash is a downgrade)", if *n == 1 { "" } else { "s" })
            }
            Relation::OtherBuild => write!(f, "the same commit, another build"),
            Relation::Different => write!(f, "a different version"),
        }
    }
}

pub fn relation(built: &str, running: &str) -> Relation {
    if built == running {
        return Relation::Same;
    }
    let (Some(b), Some(r)) = (Describe::parse(built), Describe::parse(running)) else {
        return Relation::Different;
    };
    if b.hash.is_some() && b.hash == r.hash {
        return Relation::OtherBuild;
    }
    match (b.tag == r.tag && b.tag.is_some(), b.commits, r.commits) {
        (true, Some(bc), Some(rc)) if rc < bc => Relation::Behind(bc - rc),
        (true, Some(bc), Some(rc)) if rc > bc => Relation::Ahead(rc - bc),
        _ => Relation::Different,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_klipper_and_kalico_versions() {
        let d = Describe::parse("v0.13.0-730-g84104bbbd-dirty-20260807_101500-voron").unwrap();
        assert_eq!(d.tag.as_deref(), Some("v0.13.0"));
        assert_eq!(d.commits, Some(730));
        assert_eq!(d.hash.as_deref(), Some("84104bbbd"));
        assert!(d.dirty);
        assert_eq!(d.build_suffix.as_deref(), Some("20260807_101500-voron"));
        let k = Describe::parse("v2026.07.00-30-gf2532ee34").unwrap();
        assert_eq!((k.tag.as_deref(), k.commits, k.dirty), (Some("v2026.07.00"), Some(30), false));
        let h = Describe::parse("9f74c260").unwrap();
        assert_eq!((h.tag, h.hash.as_deref()), (None, Some("9f74c260")));
        assert_eq!(Describe::parse("Beacon 2.1.0").unwrap().tag.as_deref(), Some("Beacon 2.1.0"));
        assert_eq!(Describe::parse("?"), None);
        let t = Describe::parse("v0.12.0-rc1-3-gabc").unwrap();
        assert_eq!((t.tag.as_deref(), t.commits), (Some("v0.12.0-rc1"), Some(3)));
    }

    #[test]
    fn relations() {
        assert_eq!(relation("v0.13.0-3-ga41781a", "v0.13.0-3-ga41781a"), Relation::Same);
        assert_eq!(relation("v0.13.0-30-ga41781a", "v0.13.0-3-gdeadbee"), Relation::Behind(27));
        assert_eq!(relation("v0.13.0-3-ga41781a", "v0.13.0-30-gdeadbee"), Relation::Ahead(27));
        assert_eq!(relation("v0.13.0-3-ga41781a", "v0.12.0-300-gdeadbeef"), Relation::Different);
        assert_eq!(
            relation("v0.13.0-3-ga41781a-dirty-20260807_101500-pi", "v0.13.0-3-ga41781a-dirty-20260801_090000-pi"),
            Relation::OtherBuild
        );
        assert_eq!(relation("v0.13.0-3-ga41781a", ""), Relation::Different);
        assert_eq!(Relation::Behind(1).to_string(), "1 commit behind");
    }
}
