//! Which network addresses a webhook may reach: loopback, private, link-local and the like are refused
//! unless HERALD_WEBHOOK_ALLOW lists the host or a CIDR holding the address (SSRF guard). A leaf: the
//! configuration parses the allow-list with it, the webhook client's resolver applies it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

/// A block of addresses: `10.0.0.0/8`, `::1/128`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[full] & mask == b[full] & mask
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// HERALD_WEBHOOK_ALLOW: host names and CIDRs that may be reached although restricted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    hosts: Vec<String>,
    nets: Vec<Cidr>,
}

impl AllowList {
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bare = item.trim_start_matches('[').trim_end_matches(']');
            if bare.contains('/') || bare.parse::<IpAddr>().is_ok() {
                out.nets.push(Cidr::parse(bare)?);
            } else if bare
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
            {
                out.hosts
                    .push(bare.trim_end_matches('.').to_ascii_lowercase());
            } else {
                return Err(format!(
                    "{item:?} is neither a host name nor an IP address/CIDR"
                ));
            }
        }
        Ok(out)
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// An IPv6 address that reaches an IPv4 host is allowed when either form is listed.
    fn allows_ip(&self, ip: IpAddr) -> bool {
        let inner = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.nets
            .iter()
            .any(|n| n.contains(ip) || inner.is_some_and(|v4| n.contains(v4)))
    }

    /// The addresses of `host` that may be connected to, or why none may.
    pub fn check(&self, host: &str, addrs: &[IpAddr]) -> Result<Vec<IpAddr>, Refused> {
        if self.allows_host(host) {
            return Ok(addrs.to_vec());
        }
        let mut reasons = Vec::new();
        let ok: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|ip| match restricted(*ip) {
                Some(why) if !self.allows_ip(*ip) => {
                    reasons.push(format!("{ip} is {why}"));
                    false
                }
                _ => true,
            })
            .collect();
        if ok.is_empty() {
            let why = if reasons.is_empty() {
                "it has no address".to_string()
            } else {
                reasons.join(", ")
            };
            return Err(Refused(format!(
                "webhook target {host} refused: {why} (add the host or a CIDR to HERALD_WEBHOOK_ALLOW to allow it)"
            )));
        }
        Ok(ok)
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .hosts
            .iter()
            .cloned()
            .chain(self.nets.iter().map(ToString::to_string))
            .collect();
        f.write_str(&items.join(","))
    }
}

/// The IPv4 address an IPv6 address carries on to an IPv4 host, for the forms that reach one:
/// IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, SIIT `::ffff:0:a.b.c.d`, NAT64
/// `64:ff9b::a.b.c.d` (RFC 6052, /96) and 6to4 `2002:aabb:ccdd::/48` (RFC 3056).
pub fn embedded_v4(v6: std::net::Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = v6.segments();
    let v4 = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    match seg {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(v4(hi, lo)),
        [0, 0, 0, 0, 0xffff, 0, hi, lo] => Some(v4(hi, lo)),
        // :: and ::1 are themselves, not IPv4-compatible addresses
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(v4(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        _ => None,
    }
}

/// Why a webhook may not reach this address by default, or None for a public one.
pub fn restricted(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => restricted_v4(v4),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if let Some(v4) = embedded_v4(v6) {
                // judged by the IPv4 host it reaches; the forms without a public use are refused whole
                return match seg {
                    [0, 0, 0, 0, 0, 0xffff, ..] => restricted_v4(v4),
                    [0x64, 0xff9b, ..] => {
                        restricted_v4(v4).map(|_| "NAT64 of a restricted IPv4 address")
                    }
                    [0x2002, ..] => restricted_v4(v4).map(|_| "6to4 of a restricted IPv4 address"),
                    _ => Some("reserved (IPv4-compatible or -translated)"),
                };
            }
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if seg[..6] == [0; 6] {
                Some("reserved (IPv4-compatible or -translated)")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg[0] & 0xffc0 == 0xfec0 {
                Some("private (site-local)")
            } else if seg[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if seg[0] == 0x2001 && seg[1] == 0 {
                // the client's IPv4 address is hidden (XOR-ed) inside: it may be anything
                Some("Teredo (tunnels to an IPv4 address)")
            } else if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
                Some("local-use NAT64 (RFC 8215)")
            } else if seg[0] == 0x64 && seg[1] == 0xff9b {
                Some("NAT64 (not the well-known /96 form)")
            } else if seg[0] == 0x2001 && seg[1] == 0xdb8 {
                Some("reserved (documentation)")
            } else if seg[..4] == [0x100, 0, 0, 0] {
                Some("reserved (discard-only)")
            } else {
                None
            }
        }
    }
}

fn restricted_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("private (shared address space)")
    } else if a == 192 && b == 0 && c == 0 {
        Some("reserved (IETF protocol assignments)")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("reserved (benchmarking)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if (a, b, c) == (192, 0, 2) || (a, b, c) == (198, 51, 100) || (a, b, c) == (203, 0, 113)
    {
        Some("reserved (documentation)")
    } else if a >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// A target the policy refuses: a permanent failure.
#[derive(Debug)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn restricted_addresses() {
        for (a, why) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "private (shared address space)"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fd00::1", "private (unique local)"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "NAT64 of a restricted IPv4 address"),
            ("64:ff9b::7f00:1", "NAT64 of a restricted IPv4 address"),
            // 6to4 wrapping private, loopback, link-local IPv4
            ("2002:0a00:0001::1", "6to4 of a restricted IPv4 address"),
            ("2002:7f00:0001::", "6to4 of a restricted IPv4 address"),
            ("2002:a9fe:a9fe:1::5", "6to4 of a restricted IPv4 address"),
            ("2002:c0a8:0101::1", "6to4 of a restricted IPv4 address"),
            // Teredo: the IPv4 address inside is obfuscated, so all of it
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                "Teredo (tunnels to an IPv4 address)",
            ),
            ("2001::1", "Teredo (tunnels to an IPv4 address)"),
            // local-use NAT64, whatever it wraps
            ("64:ff9b:1::a00:1", "local-use NAT64 (RFC 8215)"),
            ("64:ff9b:1:ffff::808:808", "local-use NAT64 (RFC 8215)"),
            ("64:ff9b:0:1::1", "NAT64 (not the well-known /96 form)"),
            // IPv4-compatible (deprecated) and SIIT-translated forms
            ("::10.0.0.1", "reserved (IPv4-compatible or -translated)"),
            ("::8.8.8.8", "reserved (IPv4-compatible or -translated)"),
            ("::102", "reserved (IPv4-compatible or -translated)"),
            (
                "::ffff:0:10.0.0.1",
                "reserved (IPv4-compatible or -translated)",
            ),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("2001:db8::1", "reserved (documentation)"),
            ("100::1", "reserved (discard-only)"),
            ("192.0.2.10", "reserved (documentation)"),
        ] {
            assert_eq!(restricted(ip(a)), Some(why), "{a}");
        }
        for a in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
            "2001:4860:4860::8888",
            "2001:1::1",
        ] {
            assert_eq!(restricted(ip(a)), None, "{a}");
        }
        // listed, the embedded IPv4 address counts too
        let allow = AllowList::parse("10.0.0.0/8, 2001::/32").unwrap();
        for a in [
            "2002:0a00:0001::1",
            "64:ff9b::a00:1",
            "::ffff:10.0.0.1",
            "2001:0:4136:e378::1",
        ] {
            assert!(allow.check("h", &[ip(a)]).is_ok(), "{a}");
        }
        assert!(allow.check("h", &[ip("2002:c0a8:0101::1")]).is_err());
    }

    #[test]
    fn cidr_matching() {
        let n = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.255.1.2")) && !n.contains(ip("11.0.0.1")));
        assert!(
            n.contains(ip("::ffff:10.1.1.1")),
            "IPv4-mapped addresses match IPv4 blocks"
        );
        let n = Cidr::parse("172.16.0.0/12").unwrap();
        assert!(n.contains(ip("172.31.0.1")) && !n.contains(ip("172.32.0.1")));
        let n = Cidr::parse("192.168.1.128/25").unwrap();
        assert!(n.contains(ip("192.168.1.200")) && !n.contains(ip("192.168.1.127")));
        let n = Cidr::parse("127.0.0.1").unwrap();
        assert!(n.contains(ip("127.0.0.1")) && !n.contains(ip("127.0.0.2")));
        let n = Cidr::parse("fd00::/8").unwrap();
        assert!(
            n.contains(ip("fd12::1")) && !n.contains(ip("fe80::1")) && !n.contains(ip("10.0.0.1"))
        );
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x/8", "10.0.0.0/-1"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allow_list() {
        let allow = AllowList::parse(" 127.0.0.1, 10.0.0.0/8 ,crm.internal., [::1]").unwrap();
        assert_eq!(
            allow.to_string(),
            "crm.internal,127.0.0.1/32,10.0.0.0/8,::1/128"
        );
        assert_eq!(
            allow.check("localhost", &[ip("127.0.0.1")]).unwrap(),
            vec![ip("127.0.0.1")]
        );
        assert!(allow.check("x", &[ip("127.0.0.2")]).is_err());
        assert!(allow.check("CRM.internal", &[ip("192.168.0.1")]).is_ok());
        // public addresses pass; restricted ones are dropped from a mixed answer
        assert_eq!(
            allow
                .check("mixed", &[ip("192.168.0.1"), ip("8.8.8.8")])
                .unwrap(),
            vec![ip("8.8.8.8")]
        );
        let e = AllowList::default()
            .check("evil.test", &[ip("169.254.169.254")])
            .unwrap_err()
            .0;
        assert!(
            e.contains("evil.test")
                && e.contains("169.254.169.254 is link-local")
                && e.contains("HERALD_WEBHOOK_ALLOW"),
            "{e}"
        );
        assert!(AllowList::default().check("nothing", &[]).is_err());
        assert!(AllowList::parse("10.0.0.0/40").is_err());
        assert!(AllowList::parse("bad host!").is_err());
        assert_eq!(AllowList::parse("").unwrap(), AllowList::default());
    }
}
