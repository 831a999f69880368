//! The mark-PNG reader (`project init`, marks of an image folder) on arbitrary bytes: an
//! error or a mask of the wanted size, never a panic or an unbounded allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let origin = std::path::Path::new("fuzz.png");
    if let Ok(m) = mp_core::data::folder::decode_mask(data, (28, 28), origin) {
        assert_eq!((m.width, m.height, m.values.len()), (28, 28, 784));
    }
});
