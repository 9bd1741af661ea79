// SPDX-License-Identifier: MIT
/// @file train/dead_units_io.hpp
/// @brief The dead-unit tracker's state (train/dead_units.hpp) in a safetensors file beside a
/// checkpoint, so a run with the AuxK loss resumes with the same dead units, bit for bit.
///
///     mxd::train::save_dead_units("mxd.dead.safetensors", dead);      // atomic
///     mxd::train::load_dead_units("mxd.dead.safetensors", dead);      // same unit count
///
/// Keys: `tokens_since` I64 [N], tokens since each unit was last selected; metadata
/// `model` = dead_units and `window` (informational: the window is a setting, not state).
#pragma once

#include <string>

#include "../io/safetensors.hpp"
#include "dead_units.hpp"

namespace mxd::train {

/// Writes the tracker's state to `path` (atomically, durably).
inline void save_dead_units(const std::string& path, const DeadUnits& dead) {
  io::SafetensorsWriter w;
  w.set_metadata("model", "dead_units");
  w.set_metadata("window", std::to_string(dead.window()));
  w.add("tokens_since", {static_cast<std::int64_t>(dead.units())}, dead.tokens_since().data());
  w.write(path);
}

/// Restores the tracker's state from `path`; the file must hold one count per unit of `dead`.
inline void load_dead_units(const std::string& path, DeadUnits& dead) {
  io::SafetensorsReader f(path);
  auto it = f.metadata().find("model");
  MXD_CHECK(it != f.metadata().end() && it->second == "dead_units", path,
            ": not a dead-unit state file (metadata 'model' is not 'dead_units')");
  const auto shape = f.info("tokens_since").shape;
  MXD_CHECK(shape.size() == 1 && shape[0] == dead.units(), path, ": tokens_since has shape [",
            shape.empty() ? -1 : shape[0], shape.size() > 1 ? ", ...]" : "]", " but the model has ",
            dead.units(), " units");
  dead.restore(f.read_all<std::int64_t>("tokens_since", {dead.units()}));
}

}  // namespace mxd::train
