//! `kflash install` and `kflash uninstall` on the command line: ask the one question (the
//! sudoers rule), call the library, print what it changed.

use std::path::PathBuf;

use clap::Args;
use kflash::install::{self, system, InstallRequest, Root};
use kflash::Result;

use crate::ui;

#[derive(Args)]
pub struct InstallArgs {
    /// Take the default answer to every question (the sudoers rule: yes, unless the service
    /// runs as root).
    #[arg(long, short = 'y')]
    yes: bool,
    /// Install the sudoers rule that lets the service stop and start Klipper (no question).
    #[arg(long, conflicts_with = "no_sudoers")]
    sudoers: bool,
    /// Do not install the sudoers rule (no question).
    #[arg(long)]
    no_sudoers: bool,
    /// Print what would change and change nothing (needs no root).
    #[arg(long)]
    dry_run: bool,
    /// Install into this directory as if it were / (a staged root; runs no udevadm or
    /// systemctl, needs no root).
    #[arg(long, visible_alias = "prefix", value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Where the binary goes.
    #[arg(long, value_name = "DIR", default_value = install::DEFAULT_BINDIR)]
    bindir: PathBuf,
    /// The user the service runs as (default: the Klipper service's User=, else the owner of
    /// printer_data).
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
}

#[derive(Args)]
pub struct UninstallArgs {
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Print what would be undone and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// The staged root an install went to (see `kflash install --root`).
    #[arg(long, visible_alias = "prefix", value_name = "DIR", default_value = "/")]
    root: PathBuf,
}

pub async fn install(config_dir: Option<PathBuf>, a: InstallArgs) -> Result<()> {
    let root = Root::new(&a.root);
    install::check_privileges(&root, a.dry_run, "install")?;
    let exe = std::env::current_exe()
        .map_err(|e| kflash::Error::io("find the running kflash binary", "/proc/self/exe", e))?;
    let req = InstallRequest { root: root.clone(), bindir: a.bindir.clone(), user: a.user.clone(), config_dir, exe };
    let setup = install::resolve(&req)?;
    let sudoers = if a.sudoers {
        true
    } else if a.no_sudoers {
        false
    } else if a.yes || a.dry_run {
        setup.sudoers_default()
    } else {
        ui::confirm_default(
            format!(
                "Let the service (user {}) run `systemctl stop/start/is-active {}` through sudo without a password (nothing else)?",
                setup.user.name, setup.klipper_service
            ),
            setup.sudoers_default(),
        )
        .await
    };
    let plan = install::plan(&setup, sudoers)?;
    if a.dry_run {
        println!("kflash install --dry-run: nothing is changed. It would:");
        for line in plan.describe() {
            println!("  {line}");
        }
        if let Some(rule) = plan.sudoers_rule() {
            println!("The sudoers rule ({}):\n{rule}", install::SUDOERS_PATH);
        }
        return Ok(());
    }
    let report = if root.is_system() {
        install::install(&plan, &system::HostCommands::default(), kflash::service::shutdown_signal()).await?
    } else {
        install::install(&plan, &system::StagedRoot, kflash::service::shutdown_signal()).await?
    };
    println!("kflash is installed as a service (user {}). Changed:", setup.user.name);
    print_report(&report);
    if !sudoers && !setup.sudoers_default() {
        println!("No sudoers rule: the service runs as root.");
    } else if !sudoers {
        println!(
            "No sudoers rule: flashing from the service needs `sudo -n systemctl stop {}` to work for {}.",
            setup.klipper_service, setup.user.name
        );
    }
    println!("`kflash uninstall` undoes all of it; `journalctl -u kflash` shows the service's log.");
    Ok(())
}

pub async fn uninstall(a: UninstallArgs) -> Result<()> {
    let root = Root::new(&a.root);
    install::check_privileges(&root, a.dry_run, "uninstall")?;
    let Some(steps) = install::uninstall_plan(&root)? else {
        println!("kflash is not installed here (no {}): nothing to undo.", install::MANIFEST_PATH);
        return Ok(());
    };
    if a.dry_run || !a.yes {
        println!("kflash uninstall{} would:", if a.dry_run { " --dry-run: nothing is changed. It" } else { "" });
        for line in &steps {
            println!("  {line}");
        }
        if a.dry_run {
            return Ok(());
        }
        if !ui::confirm_default("Undo the install?".into(), true).await {
            println!("Nothing was changed.");
            return Ok(());
        }
    }
    let report = if root.is_system() {
        install::uninstall(&root, &system::HostCommands::default(), kflash::service::shutdown_signal()).await?
    } else {
        install::uninstall(&root, &system::StagedRoot, kflash::service::shutdown_signal()).await?
    };
    println!("kflash is uninstalled. Changed:");
    print_report(&report);
    Ok(())
}

fn print_report(r: &install::Report) {
    for c in &r.changes {
        println!("  {c}");
    }
    for n in &r.notes {
        println!("  note: {n}");
    }
}
