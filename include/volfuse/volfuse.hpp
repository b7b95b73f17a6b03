// volfuse: compile-time specialized, fused batch-norm kernels for volumetric CNN layers.
// Umbrella header: includes the public pieces and nothing else.
#pragma once

#include "core/config.hpp"
#include "core/error.hpp"
#include "expr/evaluate.hpp"
#include "expr/nodes.hpp"
#include "expr/pointwise.hpp"
#include "kernels/reorder.hpp"
#include "nn/batchnorm3d.hpp"
#include "nn/conv3d.hpp"
#include "nn/conv_bn_relu3d.hpp"
#include "nn/pool_linear.hpp"
#include "parallel/threads.hpp"
#include "registry/registry.hpp"
#include "schedule/conv_schedule.hpp"
#include "schedule/cpu.hpp"
#include "schedule/schedule.hpp"
#include "shape/conv_geometry.hpp"
#include "shape/extent.hpp"
#include "shape/layout.hpp"
#include "shape/shape.hpp"
#include "shape/view.hpp"
