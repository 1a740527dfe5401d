// POSIX shared memory for the buffers of process groups: one named segment per rank's buffer,
// mapped by every peer. The creator unlinks the name once all peers have mapped it, so the
// memory goes away with the last mapping even if a process dies; segments whose creator died
// before that are removed the next time a process of this machine creates one.
#pragma once

#include <memory>
#include <string>

#include "../abi/objects.h"

namespace sy::host {

// A new zero-filled segment of `bytes`, named after this process; its name is in share_name.
Error create_segment(uint64_t bytes, std::shared_ptr<Memory>* out);
// Maps a peer's segment.
Error open_segment(const std::string& name, uint64_t bytes, std::shared_ptr<Memory>* out);
// Removes the segment's name (the mappings stay valid).
Error unlink_segment(Memory& memory);

}  // namespace sy::host
