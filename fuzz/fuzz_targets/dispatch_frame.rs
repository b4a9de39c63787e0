#![no_main]

use otako_gateway::fuzz::Target;

libfuzzer_sys::fuzz_target!(|data: &[u8]| Target::DispatchFrame.run(data));
