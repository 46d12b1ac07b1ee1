//! A CAN node's UUID: six bytes, written as 12 hex digits in wire order (Klipper's
//! `canbus_uuid`). Always printed with leading zeros — dropping them is a known user trap.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const UUID_LEN: usize = 6;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CanUuid(pub [u8; UUID_LEN]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a CAN UUID: expected 12 hex digits, like Klipper's canbus_uuid (e.g. 0a1b2c3d4e5f)")]
pub struct ParseUuidError(pub String);

impl CanUuid {
    pub fn bytes(&self) -> &[u8; UUID_LEN] {
        &self.0
    }
}

impl FromStr for CanUuid {
    type Err = ParseUuidError;
    fn from_str(s: &str) -> Result<CanUuid, ParseUuidError> {
        let t = s.trim();
        let bad = || ParseUuidError(s.to_string());
        if t.len() != 2 * UUID_LEN || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; UUID_LEN];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(CanUuid(out))
    }
}

impl fmt::Display for CanUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CanUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CanUuid({self})")
    }
}

impl Serialize for CanUuid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CanUuid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<CanUuid, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_with_leading_zeros() {
        let u: CanUuid = "0A1b2c3d4e5f".parse().unwrap();
        assert_eq!(u.0, [0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]);
        assert_eq!(u.to_string(), "0a1b2c3d4e5f");
        let z = CanUuid([0, 0, 0, 0, 0, 1]);
        assert_eq!(z.to_string(), "000000000001");
    }

    #[test]
    fn rejects_wrong_length_and_non_hex() {
        for bad in ["", "a1b2c3d4e5f", "0a1b2c3d4e5f0", "0x1b2c3d4e5f", "0a1b2c3d4e5g", "+a1b2c3d4e5f"] {
            let err = bad.parse::<CanUuid>().unwrap_err();
            assert!(err.to_string().contains("12 hex digits"), "{bad}: {err}");
        }
    }

    #[test]
    fn serde_is_a_string() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct T {
            u: CanUuid,
        }
        let t = T { u: CanUuid([0x0a, 0xbb, 0, 1, 2, 3]) };
        let s = toml::to_string(&t).unwrap();
        assert_eq!(s.trim(), r#"u = "0abb00010203""#);
        assert_eq!(toml::from_str::<T>(&s).unwrap(), t);
        assert!(toml::from_str::<T>(r#"u = "12""#).unwrap_err().to_string().contains("12 hex digits"));
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(bytes in any::<[u8; 6]>()) {
            let u = CanUuid(bytes);
            let s = u.to_string();
            prop_assert_eq!(s.len(), 12);
            prop_assert_eq!(s.parse::<CanUuid>().unwrap(), u);
            prop_assert_eq!(s.to_ascii_uppercase().parse::<CanUuid>().unwrap(), u);
        }
    }
}
