// The parameters of the seed networks (two conv blocks and a Linear), named as the PyTorch
// models' state_dicts name them: conv1.*, bn1.*, conv2.*, bn2.*, fc.*.
#pragma once

#include <vector>

#include <volfuse/volfuse.hpp>

namespace seed {

template <class Block1, class Block2>
std::vector<volfuse::parameter> parameters(Block1& block1, Block2& block2, volfuse::Linear& fc)
{
    std::vector<volfuse::parameter> p;
    volfuse::append_parameters(p, "conv1.", block1.conv().parameters());
    volfuse::append_parameters(p, "bn1.", block1.bn().parameters());
    volfuse::append_parameters(p, "conv2.", block2.conv().parameters());
    volfuse::append_parameters(p, "bn2.", block2.bn().parameters());
    volfuse::append_parameters(p, "fc.", fc.parameters());
    return p;
}

} // namespace seed
