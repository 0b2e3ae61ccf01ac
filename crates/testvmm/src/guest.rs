//! The guest program, assembled at run time, and the host-side references
//! (`pattern`, `page_sequence`, `dword_offsets`) that must agree with it.
//!
//! The program runs in 64-bit long mode at CPL3 with IOPL=3 (see the crate
//! docs for why), identity-mapped by page tables in the ROM slot. It uses no
//! stack and no RAM of its own: all state lives in registers, so every RAM
//! page that becomes resident was touched by the workload itself.
//!
//! # Register interface
//!
//! Set by the VMM at vCPU start (every other general register is zero):
//!
//! | register | WriteVerify / Verify                         | TouchSequential            |
//! |----------|----------------------------------------------|----------------------------|
//! | `rbx`    | scratch: gpa of the current page             | gpa of the first page      |
//! | `rcx`    | page visits done (0 at start)                | touches done (0 at start)  |
//! | `rsi`    | LCG state (reset from `r13` by each pass; ascending: pages of the pass) | - |
//! | `rdi`    | mismatching dwords (0 at start)              | 0                          |
//! | `rbp`    | gpa of the first mismatch (`!0` = none)      | `!0`                       |
//! | `r8`     | progress mask: report when `rcx & r8 == 0`   | -                          |
//! | `r9`     | touches (page visits per pass)               | count                      |
//! | `r10`    | first page, absolute (gpa >> 12)             | -                          |
//! | `r11`    | page count                                   | -                          |
//! | `r12`    | scratch: dword index within the page         | -                          |
//! | `r13`    | `seed << 32`                                 | -                          |
//! | `r14`    | [`PATTERN_MUL`]                              | -                          |
//! | `r15`    | scratch: `rcx` value that ends this pass     | -                          |
//!
//! # Port interface (all `out imm8, eax`, 4 bytes)
//!
//! [`PORT_START`] as the first instruction of every workload, before any RAM
//! access; [`PORT_PROGRESS`] every `r8 + 1` page visits, [`PORT_TOUCH`] after each
//! TouchSequential read, then once at the end [`PORT_PAGES`],
//! [`PORT_MISMATCHES`], [`PORT_FIRST_MISMATCH`], [`PORT_FIRST_MISMATCH_HIGH`] and finally [`PORT_DONE`],
//! after which the VMM does not resume the vCPU (`hlt` would #GP at CPL3).

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

/// The workload's first instruction ran (the data is meaningless).
pub(crate) const PORT_START: u16 = 0x0f;
/// Page visits done so far (`u32`).
pub(crate) const PORT_PROGRESS: u16 = 0x10;
/// A TouchSequential read completed; the data is the touch index.
pub(crate) const PORT_TOUCH: u16 = 0x11;
/// Result: page visits done.
pub(crate) const PORT_PAGES: u16 = 0x12;
/// Result: mismatching dwords (saturated at `u32::MAX`).
pub(crate) const PORT_MISMATCHES: u16 = 0x13;
/// Result: low half of the gpa of the first mismatching dword (`u64::MAX` if none).
pub(crate) const PORT_FIRST_MISMATCH: u16 = 0x14;
/// Result: high half of that gpa, sent right after the low half.
pub(crate) const PORT_FIRST_MISMATCH_HIGH: u16 = 0x16;
/// The workload is complete.
pub(crate) const PORT_DONE: u16 = 0x15;

/// Multiplier of [`pattern`]'s hash (odd, so the product is a bijection).
pub const PATTERN_MUL: u64 = 0x9E37_79B9_7F4A_7C15;
/// Multiplier of the page-sequence LCG (Numerical Recipes' `ranqd1`).
pub const LCG_MUL: u32 = 1_664_525;
/// Increment of the page-sequence LCG.
pub const LCG_ADD: u32 = 1_013_904_223;
/// How many dwords of each page WriteVerify writes and Verify checks.
pub const DWORDS_PER_PAGE: u32 = 64;

/// The value the guest writes at the dword whose guest physical address is `gpa`:
/// the high half of `(gpa ^ (seed << 32)) * PATTERN_MUL` (wrapping).
///
/// A different seed shifts every value by a non-zero constant, so a guest
/// checking with the wrong seed sees every dword mismatch.
pub fn pattern(gpa: u64, seed: u32) -> u32 {
    ((gpa ^ (u64::from(seed) << 32)).wrapping_mul(PATTERN_MUL) >> 32) as u32
}

/// The pages a WriteVerify/Verify workload visits, in order (page numbers as
/// given in the workload). The guest runs exactly this LCG:
///
/// ```text
/// state = seed
/// repeat touches times:
///     state = state * LCG_MUL + LCG_ADD            (mod 2^32)
///     page  = first_page + (state * page_count) >> 32   (64-bit product)
/// ```
///
/// Using the high half of the product picks the page from the LCG's good
/// (high) bits and needs no division. Pages may repeat.
pub fn page_sequence(seed: u32, touches: u32, first_page: u32, page_count: u32) -> Vec<u32> {
    let mut state = seed;
    (0..touches)
        .map(|_| {
            state = state.wrapping_mul(LCG_MUL).wrapping_add(LCG_ADD);
            first_page + ((u64::from(state) * u64::from(page_count)) >> 32) as u32
        })
        .collect()
}

/// Byte offsets within a page of the [`DWORDS_PER_PAGE`] dwords the guest
/// writes/verifies: one per 64-byte cache line, at line `i` the dword `i % 16`,
/// so the first (0), middle (2048) and last (4092) dwords are all included.
pub fn dword_offsets() -> impl Iterator<Item = u64> {
    (0..u64::from(DWORDS_PER_PAGE)).map(|i| i * 64 + (i % 16) * 4)
}

/// The assembled program and its entry points (guest virtual = physical addresses).
#[derive(Debug)]
pub(crate) struct Program {
    pub code: Vec<u8>,
    pub write_verify: u64,
    pub verify: u64,
    pub touch_sequential: u64,
    pub write_verify_sequential: u64,
}

/// The order a pass visits pages in.
#[derive(Clone, Copy, PartialEq)]
enum Order {
    /// [`page_sequence`]'s pseudo-random order.
    Lcg,
    /// `first_page, first_page + 1, ...`: `rsi` counts the pages of the pass.
    Ascending,
}

#[derive(Clone, Copy, PartialEq)]
enum Pass {
    Write,
    Verify,
}

/// Assembles the program to run at guest address `base`.
pub(crate) fn assemble(base: u64) -> Result<Program, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut write_verify = a.create_label();
    let mut verify = a.create_label();
    let mut touch_sequential = a.create_label();
    let mut report = a.create_label();
    let mut write_verify_sequential = a.create_label();

    // Every entry point starts with an `out` to PORT_START, so the VMM sees the
    // guest's first instruction run before it touches any RAM.
    let mut verify_pass = a.create_label();
    // WriteVerify: the write pass, then the verify pass.
    a.set_label(&mut write_verify)?;
    a.out(u32::from(PORT_START), eax)?;
    emit_pass(&mut a, Pass::Write, Order::Lcg)?;
    a.jmp(verify_pass)?;
    a.set_label(&mut verify)?;
    a.out(u32::from(PORT_START), eax)?;
    a.set_label(&mut verify_pass)?;
    emit_pass(&mut a, Pass::Verify, Order::Lcg)?;
    a.jmp(report)?;

    // WriteVerifySequential: both passes in ascending page order.
    a.set_label(&mut write_verify_sequential)?;
    a.out(u32::from(PORT_START), eax)?;
    emit_pass(&mut a, Pass::Write, Order::Ascending)?;
    emit_pass(&mut a, Pass::Verify, Order::Ascending)?;
    a.jmp(report)?;

    // TouchSequential: read one dword per page, `out` after each read so the
    // VMM timestamps every fault round trip.
    a.set_label(&mut touch_sequential)?;
    a.out(u32::from(PORT_START), eax)?;
    let mut touch_loop = a.create_label();
    a.test(r9, r9)?;
    a.jz(report)?;
    a.set_label(&mut touch_loop)?;
    a.mov(eax, dword_ptr(rbx))?;
    a.mov(eax, ecx)?;
    a.out(u32::from(PORT_TOUCH), eax)?;
    a.add(rbx, 4096)?;
    a.inc(rcx)?;
    a.cmp(rcx, r9)?;
    a.jne(touch_loop)?;

    // Results, then the final `out`; the VMM never resumes after PORT_DONE.
    a.set_label(&mut report)?;
    a.mov(eax, ecx)?;
    a.out(u32::from(PORT_PAGES), eax)?;
    a.mov(eax, u32::MAX)?; // zero-extends: rax = u32::MAX
    a.cmp(rdi, rax)?;
    a.cmovb(eax, edi)?; // saturate the 64-bit count
    a.out(u32::from(PORT_MISMATCHES), eax)?;
    a.mov(eax, ebp)?;
    a.out(u32::from(PORT_FIRST_MISMATCH), eax)?;
    a.mov(rax, rbp)?;
    a.shr(rax, 32)?;
    a.out(u32::from(PORT_FIRST_MISMATCH_HIGH), eax)?;
    a.out(u32::from(PORT_DONE), eax)?;
    a.ud2()?;

    let result = a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    Ok(Program {
        write_verify: result.label_ip(&write_verify)?,
        verify: result.label_ip(&verify)?,
        touch_sequential: result.label_ip(&touch_sequential)?,
        write_verify_sequential: result.label_ip(&write_verify_sequential)?,
        code: result.inner.code_buffer,
    })
}

/// One pass over the page sequence: `r9` visits, writing or verifying
/// `pattern()` at each of the page's `dword_offsets()`.
fn emit_pass(a: &mut CodeAssembler, pass: Pass, order: Order) -> Result<(), IcedError> {
    let mut page_loop = a.create_label();
    let mut dword_loop = a.create_label();
    let mut next_dword = a.create_label();
    let mut no_progress = a.create_label();
    let mut mismatch = a.create_label();
    let mut end = a.create_label();

    a.lea(r15, qword_ptr(rcx + r9))?; // pass ends when rcx reaches r15
    match order {
        Order::Lcg => {
            a.mov(rsi, r13)?;
            a.shr(rsi, 32)?; // LCG state = seed
        }
        Order::Ascending => a.xor(esi, esi)?, // pages of the pass so far
    }
    a.cmp(rcx, r15)?;
    a.je(end)?;

    a.set_label(&mut page_loop)?;
    // Next page: state = state * LCG_MUL + LCG_ADD; page = first + (state * count) >> 32.
    match order {
        Order::Lcg => {
            a.imul_3(esi, esi, LCG_MUL)?;
            a.add(esi, LCG_ADD)?;
            a.mov(eax, esi)?;
            a.imul_2(rax, r11)?;
            a.shr(rax, 32)?;
        }
        Order::Ascending => {
            a.mov(rax, rsi)?;
            a.inc(rsi)?;
        }
    }
    a.add(rax, r10)?;
    a.shl(rax, 12)?;
    a.mov(rbx, rax)?;

    a.xor(r12d, r12d)?;
    a.set_label(&mut dword_loop)?;
    // rax = rbx + i * 64 + (i % 16) * 4, the gpa of dword i (see dword_offsets()).
    a.mov(eax, r12d)?;
    a.and(eax, 15)?;
    a.lea(rax, qword_ptr(rbx + rax * 4))?;
    a.mov(rdx, r12)?;
    a.shl(rdx, 6)?;
    a.add(rax, rdx)?;
    // edx = pattern(rax, seed) = high32((rax ^ (seed << 32)) * PATTERN_MUL).
    a.mov(rdx, rax)?;
    a.xor(rdx, r13)?;
    a.imul_2(rdx, r14)?;
    a.shr(rdx, 32)?;
    match pass {
        Pass::Write => a.mov(dword_ptr(rax), edx)?,
        Pass::Verify => {
            a.cmp(dword_ptr(rax), edx)?;
            a.jne(mismatch)?;
        }
    }
    a.set_label(&mut next_dword)?;
    a.inc(r12d)?;
    a.cmp(r12d, DWORDS_PER_PAGE)?;
    a.jb(dword_loop)?;

    a.inc(rcx)?;
    a.test(rcx, r8)?;
    a.jnz(no_progress)?;
    a.mov(eax, ecx)?;
    a.out(u32::from(PORT_PROGRESS), eax)?;
    a.set_label(&mut no_progress)?;
    a.cmp(rcx, r15)?;
    a.jne(page_loop)?;
    a.jmp(end)?;

    if pass == Pass::Verify {
        // Out of line: count the mismatch, remember the first one's gpa.
        a.set_label(&mut mismatch)?;
        a.inc(rdi)?;
        a.cmp(rbp, -1)?;
        a.jne(next_dword)?;
        a.mov(rbp, rax)?;
        a.jmp(next_dword)?;
    }
    a.set_label(&mut end)?;
    // Labels need an instruction to attach to; a 1-byte nop keeps the passes separate.
    a.nop()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_cover_first_middle_last() {
        let offs: Vec<u64> = dword_offsets().collect();
        assert_eq!(offs.len(), DWORDS_PER_PAGE as usize);
        assert_eq!(offs[0], 0);
        assert!(offs.contains(&2048));
        assert_eq!(*offs.last().unwrap(), 4092);
        assert!(offs.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn sequence_stays_in_range() {
        let seq = page_sequence(7, 10_000, 100, 37);
        assert!(seq.iter().all(|&p| (100..137).contains(&p)));
        // Every page of a small range gets hit: the high bits are well spread.
        assert_eq!(
            seq.iter().collect::<std::collections::HashSet<_>>().len(),
            37
        );
    }

    #[test]
    fn wrong_seed_changes_every_value() {
        for gpa in (0..1 << 20).step_by(4) {
            assert_ne!(pattern(gpa, 1), pattern(gpa, 2));
        }
    }

    #[test]
    fn program_assembles() {
        let base = crate::ROM_GPA + crate::CODE_OFFSET as u64;
        let p = assemble(base).unwrap();
        assert_eq!(p.write_verify, base);
        assert!(p.verify > p.write_verify && p.touch_sequential > p.verify);
        assert!(p.code.len() < 4096);
    }
}
