//! Does this binary fit the herald extension installed in the database? Pure: the caller reads
//! `pg_extension.extversion` and acts on the verdict.
//!
//! Upgrades go database first: a new extension keeps the SQL signatures older daemons call, so a daemon
//! older than the extension runs (with a warning to upgrade it). A daemon newer than the extension may
//! call SQL that is not there yet, so it refuses to start below [`MIN_EXTENSION_VERSION`].

use std::fmt;
use std::str::FromStr;

/// The oldest extension release this binary works with. Raise it when the daemon or the CLI start
/// calling SQL (functions, columns, arguments) that an older release lacks. 0.4.0: `herald run`
/// asks `provider_kinds()` at start and the HTTP API calls `api_call`.
pub const MIN_EXTENSION_VERSION: &str = "0.4.0";

/// This binary's release.
pub const OWN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A release number, `MAJOR.MINOR.PATCH` (semver without pre-release or build parts, which herald
/// releases do not use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(u64, u64, u64);

impl FromStr for Version {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.split('.').map(|p| {
            if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                p.parse::<u64>().map_err(|_| ())
            } else {
                Err(())
            }
        });
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c), None) => Ok(Self(a?, b?, c?)),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Fits,
    /// Runs, but the operator should hear about it.
    Warn(String),
    /// Must not run: the message says what to do.
    Refuse(String),
}

/// The verdict for the installed extension version (`None`: not installed) in database `dbname`.
pub fn check(installed: Option<&str>, dbname: &str) -> Verdict {
    check_against(installed, dbname, MIN_EXTENSION_VERSION, OWN_VERSION)
}

fn check_against(installed: Option<&str>, dbname: &str, min: &str, own: &str) -> Verdict {
    let Some(installed) = installed else {
        return Verdict::Refuse(format!(
            "the herald extension is not installed in database {dbname:?}: run CREATE EXTENSION herald \
             there (after installing the extension files, e.g. make install)"
        ));
    };
    let Ok(found) = installed.parse::<Version>() else {
        return Verdict::Refuse(format!(
            "herald extension version {installed:?} in database {dbname:?} is not a MAJOR.MINOR.PATCH release \
             this daemon ({own}) can judge: install a herald release and run ALTER EXTENSION herald UPDATE"
        ));
    };
    let min_v: Version = min
        .parse()
        .expect("MIN_EXTENSION_VERSION is MAJOR.MINOR.PATCH");
    let own_v: Version = own.parse().expect("the crate version is MAJOR.MINOR.PATCH");
    if found < min_v {
        Verdict::Refuse(format!(
            "herald extension {found} is older than this daemon needs (>= {min_v}): run ALTER EXTENSION herald \
             UPDATE in database {dbname:?} (after installing the new extension files)"
        ))
    } else if found > own_v {
        Verdict::Warn(format!(
            "the database runs herald {found}, newer than this daemon ({own_v}): upgrade the daemons"
        ))
    } else {
        Verdict::Fits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_major_minor_patch() {
        assert_eq!("0.1.0".parse::<Version>(), Ok(Version(0, 1, 0)));
        assert_eq!("12.034.5".parse::<Version>(), Ok(Version(12, 34, 5)));
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "1.2.x",
            "v1.2.3",
            "1.2.3-rc1",
            " 1.2.3",
            "1..3",
            "1.2.-3",
        ] {
            assert_eq!(bad.parse::<Version>(), Err(()), "{bad:?}");
        }
        assert!("0.10.0".parse::<Version>() > "0.9.9".parse::<Version>());
        assert!("1.0.0".parse::<Version>() > "0.99.99".parse::<Version>());
    }

    #[test]
    fn the_binary_constants_parse() {
        assert!(MIN_EXTENSION_VERSION.parse::<Version>().is_ok());
        assert!(OWN_VERSION.parse::<Version>().is_ok());
        assert!(MIN_EXTENSION_VERSION.parse::<Version>() <= OWN_VERSION.parse::<Version>());
        // the extension this binary was released with always fits
        assert_eq!(check(Some(OWN_VERSION), "herald"), Verdict::Fits);
    }

    #[test]
    fn the_rule() {
        let v = |installed| check_against(installed, "shop", "0.3.0", "0.5.2");
        assert_eq!(v(Some("0.3.0")), Verdict::Fits);
        assert_eq!(v(Some("0.4.7")), Verdict::Fits);
        assert_eq!(v(Some("0.5.2")), Verdict::Fits);
        assert_eq!(
            v(Some("0.2.9")),
            Verdict::Refuse(
                "herald extension 0.2.9 is older than this daemon needs (>= 0.3.0): run ALTER EXTENSION \
                 herald UPDATE in database \"shop\" (after installing the new extension files)"
                    .into()
            )
        );
        assert_eq!(
            v(Some("0.5.3")),
            Verdict::Warn(
                "the database runs herald 0.5.3, newer than this daemon (0.5.2): upgrade the daemons"
                    .into()
            )
        );
        assert!(matches!(v(Some("1.0.0")), Verdict::Warn(_)));
        match v(Some("0.5")) {
            Verdict::Refuse(m) => assert!(
                m.contains("\"0.5\"") && m.contains("ALTER EXTENSION"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        match v(None) {
            Verdict::Refuse(m) => assert!(
                m.contains("CREATE EXTENSION herald") && m.contains("\"shop\""),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
