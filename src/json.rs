//! Conventions of kflash's JSON output shared by every report.

use std::time::Duration;

/// Durations are seconds as a number (`12.345`), not serde's `{secs, nanos}`.
pub fn serialize_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_are_seconds() {
        #[derive(serde::Serialize)]
        struct T {
            #[serde(serialize_with = "super::serialize_secs")]
            d: std::time::Duration,
        }
        let json = serde_json::to_string(&T { d: std::time::Duration::from_millis(1250) }).unwrap();
        assert_eq!(json, r#"{"d":1.25}"#);
    }
}
