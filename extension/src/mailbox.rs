//! Addresses and mailboxes: the one rule, for SQL (`herald._valid_email`: contacts, events, send();
//! `herald._valid_mailbox`: a template's or provider's sender and Reply-To) and for a definition's
//! validator (a broadcast's `from` / `reply_to`), which collects every fault with its JSON path in Rust.
//! Until 0.8.0 SQL had its own copy as regular expressions: two rules to keep in step, a regex's classes
//! (`[:space:]`) that meant what the database's locale said, and ~6,800 instructions an address.
//!
//! A mailbox is an address (`news@acme.test`: one `@`, no whitespace, a dot in the domain, at most 254
//! characters; no `<`, `>` or `"`), or a display name and an address in angle brackets
//! (`Acme News <news@acme.test>`, `"Acme, Inc." <news@acme.test>`): an unquoted name holds none of
//! `<>@,;:"\[]()`, a quoted one no `"` or `\`. At most 998 characters (one header line), and no control
//! or bidirectional-formatting characters anywhere (they make one sender display as another).

/// Characters never allowed: controls (C0, DEL, C1) and the bidirectional formatting marks.
fn forbidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// An address (`herald._valid_email`): `local@domain.tld`, one `@`, no whitespace (Unicode's), no
/// control or bidirectional-formatting character, a dot inside the domain with something after it, at
/// most 254 characters. `<`, `>` and `"` are allowed here (a contact's address is data, not a header).
pub fn valid_address(a: &str) -> bool {
    let Some((local, domain)) = a.split_once('@') else {
        return false;
    };
    let plain = |s: &str| !s.is_empty() && !s.contains('@') && !s.chars().any(char::is_whitespace);
    a.chars().count() <= 254
        && !a.chars().any(forbidden)
        && plain(local)
        && plain(domain)
        && domain
            .rfind('.')
            .is_some_and(|dot| dot > 0 && dot + 1 < domain.len())
}

/// The display name before `<`, trailing whitespace allowed: unquoted, or quoted.
fn valid_name(name: &str) -> bool {
    let trimmed = name.trim_end();
    let quoted = trimmed.len() >= 2
        && trimmed.starts_with('"')
        && trimmed.ends_with('"')
        && !trimmed[1..trimmed.len() - 1].contains(['"', '\\']);
    let unquoted = !name.is_empty()
        && !name.chars().any(|c| {
            forbidden(c)
                || matches!(
                    c,
                    ']' | '<' | '>' | '@' | ',' | ';' | ':' | '"' | '\\' | '[' | '(' | ')'
                )
        });
    quoted || unquoted
}

/// True when `m` (already trimmed) is a mailbox herald accepts.
pub fn is_valid(m: &str) -> bool {
    if m.chars().count() > 998 || m.chars().any(forbidden) {
        return false;
    }
    if valid_address(m) && !m.contains(['<', '>', '"']) {
        return true;
    }
    let Some(inner) = m.strip_suffix('>') else {
        return false;
    };
    let Some((name, address)) = inner.split_once('<') else {
        return false;
    };
    !address.is_empty()
        && !address.contains(['<', '>'])
        && valid_name(name)
        && valid_address(address)
}

/// What a fault says about a value that is not a mailbox.
pub const HELP: &str = "a mailbox: an address (news@example.com) or a name and an address \
    (Example News <news@example.com>; quote a name holding , ; : @ or parentheses: \"Example, Inc.\" <news@example.com>)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_as_contacts_hold_them() {
        for ok in [
            "a@b.c",
            "a.b+c@d..e.f",
            "zoë@exämple.com",
            "\"q\"@x.io",
            "<a>@x.io",
        ] {
            assert!(valid_address(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "a@b",
            "@b.c",
            "a@.c",
            "a@b.",
            "a@b.c.",
            "a@@b.c",
            "a b@c.d",
            "a\u{a0}b@c.d",
            "a\u{3000}@c.d",
            "a\u{85}@c.d",
            "a\u{202e}@c.d",
            "a\u{7f}@c.d",
        ] {
            assert!(!valid_address(bad), "{bad:?}");
        }
        assert!(valid_address(&format!("{}@x.io", "a".repeat(249))));
        assert!(!valid_address(&format!("{}@x.io", "a".repeat(250))));
        // characters, not bytes
        assert!(valid_address(&format!("{}@x.io", "é".repeat(249))));
    }

    #[test]
    fn addresses_and_named_addresses() {
        for ok in [
            "news@acme.test",
            "Acme News <news@acme.test>",
            "Acme<news@acme.test>",
            "\"Acme, Inc.\" <news@acme.test>",
            "Zoë Müller <zoe@acme.test>",
            "first.last+tag@mail.acme.test",
        ] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            "news",
            "news@acme",
            "news@@acme.test",
            "news @acme.test",
            "<news@acme.test>",
            "Acme <news@acme>",
            "Acme, Inc. <news@acme.test>",
            "Acme <news@acme.test",
            "Acme <news@acme.test> x",
            "\"Acme \\\" x\" <news@acme.test>",
            "Acme\r\nBcc: x@evil.test <news@acme.test>",
            "Acme \u{202e}tset <news@acme.test>",
            "\"news\"@acme.test",
            "a <b <news@acme.test>>",
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
        assert!(!is_valid(&format!("{}@acme.test", "a".repeat(250))));
        assert!(is_valid(&format!("{} <news@acme.test>", "N".repeat(980))));
        assert!(!is_valid(&format!("{} <news@acme.test>", "N".repeat(990))));
    }
}
