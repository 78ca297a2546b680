//! What the live endpoint (`GET <base>/live?view=…`) answers: the page's numbers by key, which
//! admin.js puts in place every few seconds. `text` replaces the text of `[data-live=key]`,
//! `html` the markup of `[data-live-html=key]` (charts: SVG built and escaped here), `attrs` sets
//! attributes of `[data-live-attrs=key]` (progress bars' value and max).

use std::collections::BTreeMap;

#[derive(Debug, Default, serde::Serialize, PartialEq)]
pub struct Live {
    pub text: BTreeMap<String, String>,
    pub html: BTreeMap<String, String>,
    pub attrs: BTreeMap<String, BTreeMap<String, String>>,
}

impl Live {
    pub fn text(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.text.insert(key.into(), value.into());
    }

    pub fn html(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.html.insert(key.into(), value.into());
    }

    pub fn progress(&mut self, key: impl Into<String>, value: i64, max: i64) {
        self.attrs.insert(
            key.into(),
            BTreeMap::from([
                ("value".to_string(), value.max(0).to_string()),
                ("max".to_string(), max.max(1).to_string()),
            ]),
        );
    }
}
