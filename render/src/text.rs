//! The plain-text part of an email whose template has none: derived from the rendered HTML.

/// A crude plain-text version of an HTML body: tags dropped (block ends and `<br>` become line breaks,
/// links keep their target), `<head>`, `<style>` and `<script>` dropped whole, common entities decoded,
/// blank runs collapsed.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        rest = &rest[lt..];
        let Some(gt) = rest.find('>') else {
            out.push_str(rest);
            rest = "";
            break;
        };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        let closing = tag.starts_with('/');
        match name.as_str() {
            "head" | "style" | "script" | "title" if !closing => {
                let end = format!("</{name}");
                match rest.to_ascii_lowercase().find(&end) {
                    Some(i) => {
                        rest = &rest[i..];
                        if let Some(gt) = rest.find('>') {
                            rest = &rest[gt + 1..];
                        }
                    }
                    None => rest = "",
                }
            }
            "br" => out.push('\n'),
            "p" | "div" | "tr" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "ul" | "ol"
            | "table" | "blockquote" => out.push('\n'),
            "li" if !closing => out.push_str("\n- "),
            "a" if !closing => {
                if let Some(href) = attribute(tag, "href") {
                    // the link text follows; its target is added after it
                    out.push('\u{1}');
                    out.push_str(&href);
                    out.push('\u{2}');
                }
            }
            "a" => out.push('\u{3}'),
            _ => {}
        }
    }
    out.push_str(rest);
    let out = place_links(&out);
    let decoded = decode_entities(&out);
    // collapse spaces inside lines, and runs of blank lines
    let mut text = String::with_capacity(decoded.len());
    let mut blank = 0;
    for line in decoded.lines() {
        let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.is_empty() {
            blank += 1;
            if blank == 1 && !text.is_empty() {
                text.push('\n');
            }
        } else {
            blank = 0;
            text.push_str(&line);
            text.push('\n');
        }
    }
    text.trim().to_string() + "\n"
}

/// `\1href\2text\3` → `text (href)`, or just `href` when the text is the address.
fn place_links(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find('\u{1}') {
        out.push_str(&rest[..start]);
        rest = &rest[start + 1..];
        let (href, after) = rest.split_once('\u{2}').unwrap_or((rest, ""));
        let (text, after) = after.split_once('\u{3}').unwrap_or((after, ""));
        let t = text.trim();
        if t.is_empty() || t == href {
            out.push_str(href);
        } else {
            out.push_str(&format!("{t} ({href})"));
        }
        rest = after;
    }
    out.push_str(rest);
    out.replace('\u{3}', "")
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let at = lower.find(&format!("{name}="))? + name.len() + 1;
    let value = &tag[at..];
    let value = match value.chars().next()? {
        q @ ('"' | '\'') => value[1..].split(q).next()?,
        _ => value
            .split(|c: char| c.is_whitespace() || c == '>')
            .next()?,
    };
    Some(decode_entities(value))
}

pub fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let end = rest[1..]
            .find(|c: char| c == ';' || c == '&' || c.is_whitespace())
            .map(|i| i + 1);
        let decoded = end.filter(|&e| rest.as_bytes()[e] == b';').and_then(|e| {
            let entity = &rest[1..e];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" | "#x27" => Some('\''),
                "nbsp" => Some(' '),
                _ if entity.starts_with("#x") || entity.starts_with("#X") => {
                    u32::from_str_radix(&entity[2..], 16)
                        .ok()
                        .and_then(char::from_u32)
                }
                _ if entity.starts_with('#') => entity[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            }?;
            Some((c, e + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_to_text_is_readable() {
        let html = "<html><head><title>T</title><style>p {color: red}</style></head><body>\
                    <h1>Welcome&nbsp;Ann</h1><p>Your code is <b>42</b> &amp; counting.</p>\
                    <ul><li>one</li><li>two</li></ul><p>See <a href=\"https://x.test/a?b=1&amp;c=2\">the docs</a> \
                    or <a href='https://y.test'>https://y.test</a>.<br>Bye &#8212; &#x263A; &unknown;</p></body></html>";
        assert_eq!(
            html_to_text(html),
            "Welcome Ann\n\nYour code is 42 & counting.\n\n- one\n- two\n\nSee the docs (https://x.test/a?b=1&c=2) or https://y.test.\nBye \u{2014} \u{263A} &unknown;\n"
        );
        assert_eq!(html_to_text("plain"), "plain\n");
        assert_eq!(html_to_text("a < b"), "a < b\n");
    }
}
