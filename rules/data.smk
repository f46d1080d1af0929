rule data:
    message:
        f"{DATASET} archive (md5 checked) -> HDF5 train / val / test / unlabelled"
    input:
        archive=data_archive(),
    output:
        train=f"{DATA}/train.h5",
        val=f"{DATA}/val.h5",
        test=f"{DATA}/test.h5",
        unlabelled=f"{DATA}/unlabelled.h5",
    params:
        cfg=stage_params("data"),
        params_file=PARAMS_FILE,
        out_dir=DATA,
    log:
        "logs/data.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        THREADS + "python -m pipeline.data --params {params.params_file} --out-dir {params.out_dir} 2> {log}"
