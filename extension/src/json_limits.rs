//! Bounds on JSON a tenant hands in: nesting depth and size, measured on the text.
//!
//! serde_json refuses documents nested deeper than 128 levels, and everything herald parses
//! (`tick()`'s batch, `_matches`' arguments) nests a tenant's JSON inside its own. So SQL checks what
//! it stores at ingest (`herald._json_fault(payload::text, 32, 65536)`) and a definition is checked
//! before it is parsed. The scan is one pass over the bytes: no recursion, no `Value` built, so a
//! hostile document costs O(length) and cannot exhaust the stack.

/// Why `text` is out of bounds, or `None` when its nesting depth is at most `max_depth` and its
/// length at most `max_bytes`. Depth counts open arrays and objects: `1` is 0 deep, `[1]` 1,
/// `{"a": [1]}` 2. The message reads after the thing's name: "payload " + "nests 200 levels deep; …".
/// The text is assumed to be JSON (Postgres' json/jsonb output); on anything else the depth is
/// still computed the same way (brackets outside strings), which is all the bound needs.
pub fn fault(text: &str, max_depth: usize, max_bytes: usize) -> Option<String> {
    if text.len() > max_bytes {
        return Some(format!(
            "is {} bytes; at most {max_bytes} are allowed",
            text.len()
        ));
    }
    let depth = max_depth_of(text);
    let levels = if depth == 1 { "level" } else { "levels" };
    (depth > max_depth)
        .then(|| format!("nests {depth} {levels} deep; at most {max_depth} are allowed"))
}

/// The deepest nesting of arrays and objects in `text`; brackets inside strings do not count.
pub fn max_depth_of(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for &b in text.as_bytes() {
        if in_string {
            // multi-byte UTF-8 never contains bytes below 0x80, so byte-wise is exact
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert_eq!(max_depth_of("1"), 0);
        assert_eq!(max_depth_of("\"x\""), 0);
        assert_eq!(max_depth_of("[]"), 1);
        assert_eq!(max_depth_of("{}"), 1);
        assert_eq!(max_depth_of(r#"{"a": [1, {"b": 2}], "c": [3]}"#), 3);
        assert_eq!(max_depth_of(&nested(200)), 200);
        assert_eq!(max_depth_of(r#"[[1], [2], [[3]]]"#), 3);
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        assert_eq!(max_depth_of(r#"{"a": "[[[[{{{{"}"#), 1);
        assert_eq!(max_depth_of(r#"["]]]]", ["x"]]"#), 2);
        assert_eq!(max_depth_of(r#"{"[": "}"}"#), 1);
    }

    #[test]
    fn escaped_quotes_and_backslashes() {
        // the string is  a"[[[  : the escaped quote does not end it
        assert_eq!(max_depth_of(r#"["a\"[[[", 1]"#), 1);
        // the string is  a\  : the escaped backslash does not escape the closing quote
        assert_eq!(max_depth_of(r#"["a\\", [[1]]]"#), 3);
        assert_eq!(max_depth_of(r#"["\\\"[", "\u005b"]"#), 1);
        // non-ASCII text inside and outside strings
        assert_eq!(max_depth_of(r#"{"é[": ["ü"]}"#), 2);
    }

    #[test]
    fn faults_name_the_measure_and_the_limit() {
        assert_eq!(fault(&nested(32), 32, 65_536), None);
        assert_eq!(
            fault(&nested(200), 32, 65_536).as_deref(),
            Some("nests 200 levels deep; at most 32 are allowed")
        );
        let big = format!("\"{}\"", "x".repeat(1_999_998));
        assert_eq!(
            fault(&big, 32, 65_536).as_deref(),
            Some("is 2000000 bytes; at most 65536 are allowed")
        );
        assert_eq!(
            fault("{}", 0, 65_536).as_deref(),
            Some("nests 1 level deep; at most 0 are allowed")
        );
        assert_eq!(fault("1", 0, 1), None);
        assert_eq!(fault("", 0, 0), None);
    }

    #[test]
    fn a_million_levels_is_linear_and_safe() {
        let deep = nested(1_000_000);
        let t = std::time::Instant::now();
        assert_eq!(max_depth_of(&deep), 1_000_000);
        assert!(t.elapsed().as_secs() < 2);
    }
}
