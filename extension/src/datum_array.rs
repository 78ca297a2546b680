//! `text[]` and `int4[]` results built with one `construct_array` call.
//!
//! pgrx turns a `Vec<T>` into an array through `initArrayResult` / `accumArrayResult` /
//! `makeArrayResult`: a build state per array, every element copied twice and the element type's
//! layout looked up in the catalog cache on every array. `_steps` returns three arrays per
//! enrollment (the step log's nodes, visits and actions), so that was ~9,000 instructions an
//! enrollment, 3.4% of a tick (callgrind). Here the elements are made once and the layout is the
//! built-in types' own (text: varlena, int-aligned; int4: 4 bytes by value).

use std::ffi::c_char;

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::{Datum, IntoDatum};
use pgrx::pg_sys;

/// A `text[]` result.
pub struct TextArray(pub Vec<String>);

/// An `int4[]` result.
pub struct Int4Array(pub Vec<i32>);

impl IntoDatum for TextArray {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        let mut elems: Vec<pg_sys::Datum> = self
            .0
            .iter()
            .map(|s| {
                // SAFETY: copies `s.len()` bytes of a live Rust string into a palloc'd text in the
                // current memory context (the SRF's, as pgrx's own conversion does)
                let t = unsafe {
                    pg_sys::cstring_to_text_with_len(s.as_ptr() as *const c_char, len_i32(s.len()))
                };
                pg_sys::Datum::from(t)
            })
            .collect();
        // SAFETY: `elems` holds `len` valid text datums; construct_array copies them into one
        // palloc'd array and keeps no pointer to `elems`
        let array = unsafe {
            pg_sys::construct_array(
                elems.as_mut_ptr(),
                len_i32(elems.len()),
                pg_sys::TEXTOID,
                -1,
                false,
                pg_sys::TYPALIGN_INT as c_char,
            )
        };
        Some(pg_sys::Datum::from(array))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::TEXTARRAYOID
    }
}

impl IntoDatum for Int4Array {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        let mut elems: Vec<pg_sys::Datum> =
            self.0.iter().map(|v| pg_sys::Datum::from(*v)).collect();
        // SAFETY: `elems` holds `len` int4 datums (by value); construct_array copies them
        let array = unsafe {
            pg_sys::construct_array(
                elems.as_mut_ptr(),
                len_i32(elems.len()),
                pg_sys::INT4OID,
                4,
                true,
                pg_sys::TYPALIGN_INT as c_char,
            )
        };
        Some(pg_sys::Datum::from(array))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::INT4ARRAYOID
    }
}

/// Lengths here are of a step log (a few entries of short strings); Postgres caps a text at 1 GB.
fn len_i32(n: usize) -> i32 {
    i32::try_from(n).expect("array or text longer than 2 GB")
}

// SAFETY (both): the datum is returned to the function's caller, as pgrx's own impls do.
unsafe impl BoxRet for TextArray {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.into_datum() {
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}

unsafe impl BoxRet for Int4Array {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.into_datum() {
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}

pgrx::impl_sql_translatable!(TextArray, "text[]");
pgrx::impl_sql_translatable!(Int4Array, "integer[]");
