// Uses volfuse the way a downstream project would: the umbrella header and one layer.
#include <cstdio>
#include <vector>

#include <volfuse/volfuse.hpp>

int main()
{
    namespace vf = volfuse;
    std::vector<float> x{1, 2, 3, 4, 5, 6, 7, 8}, y(8);
    vf::BatchNorm3d<2> bn(2);
    bn.forward(vf::ncdhw_view(x.data(), 2, 2, 1, 1, 2), vf::ncdhw_view(y.data(), 2, 2, 1, 1, 2), vf::relu);
    std::printf("%s running_mean=[%g, %g]\n", bn.repr().c_str(), bn.running_mean()[0], bn.running_mean()[1]);
    return bn.running_mean()[0] == 0.35f && bn.running_mean()[1] == 0.55f ? 0 : 1;
}
