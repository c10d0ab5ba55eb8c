//! What the emulator reads from the PTX a module is loaded from: its entry points, and the
//! static shared memory each uses, which a GPU caps at 48 KiB per block (ptxas refuses the
//! module above it: "uses too much shared data"). Kernels here keep their `__shared__` arrays
//! in host thread-locals of any size, so without this a tile grown past the limit would pass
//! every emulated test and fail on the first GPU.

/// Static shared memory a block may use without opting in to more (every GPU since sm_20).
pub const MAX_STATIC_SHARED_BYTES: usize = 48 * 1024;

/// One entry point of a module and the static shared memory it uses (its own declarations,
/// the module-scope ones it or a function it calls refers to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub shared_bytes: usize,
}

/// A `.entry` or `.func` and its body.
struct Block<'a> {
    name: String,
    is_entry: bool,
    body: &'a str,
}

/// The entries of `ptx`, with their shared memory.
pub fn entries(ptx: &str) -> Vec<Entry> {
    let (blocks, module_scope) = split(ptx);
    let module_shared: Vec<(String, usize)> = module_scope
        .iter()
        .flat_map(|text| shared_declarations(text))
        .collect();
    let funcs: Vec<&Block> = blocks.iter().filter(|b| !b.is_entry).collect();
    blocks
        .iter()
        .filter(|b| b.is_entry)
        .map(|entry| {
            // The entry and every function it reaches through calls.
            let mut reached: Vec<&Block> = vec![entry];
            let mut i = 0;
            while i < reached.len() {
                for f in &funcs {
                    let called = mentions(reached[i].body, &f.name);
                    if called && !reached.iter().any(|r| r.name == f.name) {
                        reached.push(f);
                    }
                }
                i += 1;
            }
            let own: usize = reached
                .iter()
                .flat_map(|b| shared_declarations(b.body))
                .map(|(_, bytes)| bytes)
                .sum();
            let module: usize = module_shared
                .iter()
                .filter(|(name, _)| reached.iter().any(|b| mentions(b.body, name)))
                .map(|(_, bytes)| bytes)
                .sum();
            Entry {
                name: entry.name.clone(),
                shared_bytes: own + module,
            }
        })
        .collect()
}

/// The module's `.entry` and `.func` blocks, and the text between them (module scope).
fn split(ptx: &str) -> (Vec<Block<'_>>, Vec<&str>) {
    let mut blocks = Vec::new();
    let mut module_scope = Vec::new();
    let mut rest = ptx;
    loop {
        let next = [".entry ", ".func "]
            .iter()
            .filter_map(|kw| rest.find(kw).map(|at| (at, *kw)))
            .min();
        let Some((at, keyword)) = next else {
            module_scope.push(rest);
            break;
        };
        module_scope.push(&rest[..at]);
        let after = &rest[at + keyword.len()..];
        // `.func (.param .b32 retval) name(` names the function after its return values.
        let named = match after.trim_start().strip_prefix('(') {
            Some(returns) => returns.split_once(')').map_or("", |(_, name)| name),
            None => after,
        };
        let name: String = named
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$')
            .collect();
        let Some(open) = after.find('{') else {
            // A declaration without a body (`.extern .func`): nothing to count.
            rest = after;
            continue;
        };
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        blocks.push(Block {
            name,
            is_entry: keyword == ".entry ",
            body: &after[open..end],
        });
        rest = &after[end..];
    }
    (blocks, module_scope)
}

/// `.shared` declarations in `text`: each name and its bytes (`.b8 name[8320]`, `.f32 x[4]`,
/// `.u32 y`).
fn shared_declarations(text: &str) -> Vec<(String, usize)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim().strip_prefix(".shared")?;
            let line = line.trim_end_matches(';');
            let words = line.split_whitespace().filter(|w| !w.starts_with(".align"));
            let mut element_bits = 8usize;
            let mut declared = None;
            for word in words {
                if let Some(kind) = word.strip_prefix('.') {
                    if kind.chars().all(|c| c.is_ascii_digit()) {
                        continue; // the .align value
                    }
                    let bits: String = kind.chars().skip(1).collect();
                    element_bits = bits.parse().unwrap_or(element_bits);
                } else if word.chars().all(|c| c.is_ascii_digit()) {
                    continue; // the .align value
                } else {
                    declared = Some(word);
                    break;
                }
            }
            let declared = declared?;
            let (name, count) = match declared.split_once('[') {
                Some((name, count)) => (name, count.trim_end_matches(']').parse().ok()?),
                None => (declared, 1usize),
            };
            Some((name.to_string(), count * element_bits.div_ceil(8)))
        })
        .collect()
}

/// Whether `body` refers to `name` as a whole identifier.
fn mentions(body: &str, name: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$';
    body.match_indices(name).any(|(at, _)| {
        let before = body[..at].chars().next_back();
        let after = body[at + name.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = r#".version 8.8
.target sm_90
.address_size 64

.shared .align 4 .b8 _ZZ4tileE6w_tile[40000];
.shared .align 4 .b8 _ZZ4tileE6x_tile[2048];
.shared .align 4 .b8 _ZZ5otherE5cache[8192];

.func  (.param .b32 func_retval0) helper(
	.param .b32 helper_param_0
)
{
	ld.shared.f32 	%f1, [_ZZ5otherE5cache];
	ret;
}

.visible .entry small(
	.param .u64 small_param_0
)
{
	.shared .align 4 .b8 _ZZ5smallE4best[1024];
	ld.shared.u32 	%r1, [_ZZ5smallE4best];
	ret;
}

.visible .entry big(
	.param .u64 big_param_0
)
{
	.shared .align 4 .f32 _ZZ3bigE5extra[2000];
	ld.shared.f32 	%f1, [_ZZ4tileE6w_tile];
	ld.shared.f32 	%f2, [_ZZ4tileE6x_tile];
	call.uni (retval0), helper, (param0);
	ret;
}
"#;

    #[test]
    fn each_entry_counts_its_own_and_the_module_shared_memory_it_reaches() {
        let entries = entries(PTX);
        assert_eq!(
            entries,
            [
                Entry {
                    name: "small".into(),
                    shared_bytes: 1024
                },
                Entry {
                    name: "big".into(),
                    // its 2000 f32, two module-scope tiles, and helper's cache
                    shared_bytes: 8000 + 40000 + 2048 + 8192
                },
            ]
        );
        assert!(entries[1].shared_bytes > MAX_STATIC_SHARED_BYTES);
    }
}
