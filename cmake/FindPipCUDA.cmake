# Locate a CUDA toolkit for holokv and report it in HOLOKV_CUDA_ROOT (empty if none).
# Order: CUDACXX / CMAKE_CUDA_COMPILER, CUDA_HOME, NVIDIA's pip packages installed
# next to torch (nvidia/cuXX with nvcc), nvcc on PATH.
#
# NVIDIA's pip packages hold a complete toolkit in a layout nvcc does not expect:
# nvcc.profile looks for targets/<arch>/{include,lib64}, and only versioned
# libX.so.N are shipped. Links make that tree usable as an ordinary toolkit root.

function(_holokv_fix_pip_toolkit root)
  set(tgt "${root}/targets/${CMAKE_HOST_SYSTEM_PROCESSOR}-linux")
  foreach(pair "include;include" "lib;lib" "lib64;lib")
    list(GET pair 0 name)
    list(GET pair 1 dest)
    if(NOT EXISTS "${tgt}/${name}")
      file(MAKE_DIRECTORY "${tgt}")
      file(CREATE_LINK "${root}/${dest}" "${tgt}/${name}" SYMBOLIC)
    endif()
  endforeach()
  file(GLOB sonames "${root}/lib/lib*.so.*")
  foreach(so IN LISTS sonames)
    get_filename_component(fname "${so}" NAME)
    string(REGEX REPLACE "\\.so\\..*$" ".so" plain "${fname}")
    if(NOT EXISTS "${root}/lib/${plain}")
      file(CREATE_LINK "${fname}" "${root}/lib/${plain}" SYMBOLIC)
    endif()
  endforeach()
endfunction()

set(HOLOKV_CUDA_ROOT "")
if(DEFINED ENV{CUDACXX} OR CMAKE_CUDA_COMPILER)
  set(_nvcc "$ENV{CUDACXX}")
  if(CMAKE_CUDA_COMPILER)
    set(_nvcc "${CMAKE_CUDA_COMPILER}")
  endif()
  get_filename_component(HOLOKV_CUDA_ROOT "${_nvcc}/../.." ABSOLUTE)
elseif(DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
  set(HOLOKV_CUDA_ROOT "$ENV{CUDA_HOME}")
else()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import glob, os, sysconfig; print(next(iter(sorted(glob.glob(os.path.join(sysconfig.get_paths()['purelib'], 'nvidia', 'cu*', 'bin', 'nvcc')))), ''))"
    OUTPUT_VARIABLE _pip_nvcc OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(_pip_nvcc)
    get_filename_component(HOLOKV_CUDA_ROOT "${_pip_nvcc}/../.." ABSOLUTE)
    _holokv_fix_pip_toolkit("${HOLOKV_CUDA_ROOT}")
    message(STATUS "holokv: using the pip CUDA toolkit at ${HOLOKV_CUDA_ROOT}")
  else()
    find_program(_path_nvcc nvcc HINTS /usr/local/cuda/bin)
    if(_path_nvcc)
      get_filename_component(_path_nvcc "${_path_nvcc}" REALPATH)
      get_filename_component(HOLOKV_CUDA_ROOT "${_path_nvcc}/../.." ABSOLUTE)
    endif()
  endif()
endif()
