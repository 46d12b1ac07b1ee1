//! The files `kflash install` writes: the unit (templated for the printer user and the
//! bindir), the udev rules and the sudoers drop-in. The unit and rules are compiled into the
//! binary, so an installed kflash can reinstall itself without its source tree.

use std::path::Path;

use super::InstallError;

/// systemd/kflash.service, with `@USER@`, `@GROUP@` and `@BINDIR@` to fill in.
pub const UNIT_TEMPLATE: &str = include_str!("../../systemd/kflash.service");
/// udev-rules/70-kflash.rules, installed as is.
pub const UDEV_RULES: &str = include_str!("../../udev-rules/70-kflash.rules");

/// The unit for `user`:`group` running `<bindir>/kflash daemon`.
pub fn unit(user: &str, group: &str, bindir: &Path) -> Result<String, InstallError> {
    check_name("user", user)?;
    check_name("group", group)?;
    let bindir = check_path("bindir", bindir)?;
    Ok(UNIT_TEMPLATE.replace("@USER@", user).replace("@GROUP@", group).replace("@BINDIR@", bindir))
}

/// The sudoers drop-in: `user` may run exactly `systemctl stop|start|is-active <service>` as
/// root, without a password. `is-active` is read-only; the Klipper guard asks it (through
/// the same `service_command`) before it stops Klipper, so without it every flash by the
/// service would fail with "a password is required".
pub fn sudoers(user: &str, systemctl: &Path, service: &str) -> Result<String, InstallError> {
    check_name("user", user)?;
    check_name("Klipper service", service)?;
    let systemctl = check_path("systemctl", systemctl)?;
    let commands: Vec<String> =
        ["stop", "start", "is-active"].iter().map(|verb| format!("{systemctl} {verb} {service}")).collect();
    Ok(format!(
        "# Written by `kflash install`; `kflash uninstall` removes it.\n\
         # Lets the kflash service (user {user}) stop and start Klipper ({service}) around a flash,\n\
         # and ask whether it runs. Nothing else.\n\
         {user} ALL=(root) NOPASSWD: {}\n",
        commands.join(", ")
    ))
}

/// Plain names only: they go into a unit file and a sudoers line, where spaces, commas,
/// colons, '=' or backslashes would change the meaning.
pub fn check_name(what: &'static str, value: &str) -> Result<(), InstallError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@');
    if value.is_empty() || value.starts_with('-') || !value.chars().all(ok_char) {
        return Err(InstallError::BadName {
            what,
            value: value.to_string(),
            why: "only letters, digits, '.', '_', '-' and '@', not starting with '-'",
        });
    }
    Ok(())
}

fn check_path<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, InstallError> {
    let text = path.to_str().unwrap_or("");
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '+');
    if !path.is_absolute() || !text.chars().all(ok_char) {
        return Err(InstallError::BadName {
            what,
            value: path.display().to_string(),
            why: "an absolute path of letters, digits, '/', '.', '_', '-' and '+'",
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_is_filled_in_completely() {
        let u = unit("pi", "pi", Path::new("/usr/local/bin")).unwrap();
        assert!(u.lines().filter(|l| !l.starts_with('#')).all(|l| !l.contains('@')), "{u}");
        assert!(u.contains("\nUser=pi\n") && u.contains("\nGroup=pi\n"));
        assert!(u.contains("\nExecStart=/usr/local/bin/kflash daemon\n"));
        assert!(u.contains("\nType=notify\n") && u.contains("\nNotifyAccess=main\n"));
        assert!(u.contains("\nRestart=on-failure\n"));
    }

    #[test]
    fn no_directive_that_implies_no_new_privileges() {
        // sudo must keep working for a service that runs as a user (see the unit's comment).
        let u = unit("pi", "pi", Path::new("/usr/local/bin")).unwrap();
        let active: Vec<&str> = u.lines().filter(|l| !l.starts_with('#')).collect();
        for d in [
            "NoNewPrivileges=",
            "SystemCallFilter=",
            "SystemCallArchitectures=",
            "RestrictAddressFamilies=",
            "RestrictNamespaces=",
            "RestrictRealtime=",
            "RestrictSUIDSGID=",
            "LockPersonality=",
            "MemoryDenyWriteExecute=",
            "PrivateDevices=",
            "ProtectClock=",
            "ProtectHostname=",
            "ProtectKernelTunables=",
            "ProtectKernelModules=",
            "ProtectKernelLogs=",
            "DynamicUser=",
            "PrivateNetwork=",
            "ProtectHome=",
            "CapabilityBoundingSet=",
            "PrivateUsers=",
        ] {
            assert!(!active.iter().any(|l| l.starts_with(d)), "{d} must not be set");
        }
    }

    #[test]
    fn sudoers_names_exactly_three_commands() {
        let s = sudoers("pi", Path::new("/usr/bin/systemctl"), "klipper").unwrap();
        let rules: Vec<&str> = s.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            rules,
            ["pi ALL=(root) NOPASSWD: /usr/bin/systemctl stop klipper, /usr/bin/systemctl start klipper, /usr/bin/systemctl is-active klipper"]
        );
        assert!(!s.contains("ALL\n") && !s.contains("NOPASSWD: ALL"));
    }

    #[test]
    fn names_that_would_change_the_rule_are_refused() {
        for bad in ["", "-x", "pi,root", "a b", "a:b", "a=b", "a\\b", "ALL ALL", "x\n"] {
            assert!(sudoers(bad, Path::new("/usr/bin/systemctl"), "klipper").is_err(), "{bad:?}");
            assert!(sudoers("pi", Path::new("/usr/bin/systemctl"), bad).is_err(), "{bad:?}");
        }
        assert!(unit("pi", "pi", Path::new("relative/bin")).is_err());
        assert!(unit("pi", "pi", Path::new("/opt/my bin")).is_err());
        assert!(sudoers("pi", Path::new("/usr/bin/systemctl, ALL"), "klipper").is_err());
        assert!(sudoers("klipper-2", Path::new("/usr/bin/systemctl"), "klipper-2@x.service").is_ok());
    }
}
